//! The two ends of an RFB (VNC) handshake the console proxy performs for an
//! external desktop: as a client toward the desktop's VNC server (answering
//! its VNC-authentication challenge with the password the broker keeps),
//! and as a server toward the browser (offering "None", since the broker
//! authenticated the user already). After both, the bytes flow unchanged:
//! the browser's ClientInit reaches the desktop, its ServerInit the browser.

use des::cipher::{BlockEncrypt, KeyInit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The version both ends speak.
pub(crate) const VERSION: &[u8; 12] = b"RFB 003.008\n";
const SEC_NONE: u8 = 1;
const SEC_VNC: u8 = 2;

/// Why a handshake failed.
pub(crate) fn fail(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

async fn reason<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let n = s.read_u32().await? as usize;
    // A reason is a short text; a length beyond that is a broken peer.
    if n > 4096 {
        return Err(fail(format!("the desktop sent a {n}-byte reason")));
    }
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The response to a VNC-authentication challenge: DES with the password
/// (at most 8 bytes, zero-padded) as the key, each key byte's bits
/// mirrored, as RFB specifies.
pub(crate) fn vnc_response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = des::Des::new(&key.into());
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(block.into());
    }
    out
}

/// Client side toward a VNC server, up to a successful SecurityResult.
pub(crate) async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    password: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await?;
    if !version.starts_with(b"RFB 003.") {
        return Err(fail("the desktop does not speak RFB (VNC)"));
    }
    let minor: u32 = std::str::from_utf8(&version[8..11])
        .ok()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| fail("the desktop sent a malformed RFB version"))?;
    if minor < 7 {
        // 3.3: the server picks; 3.8 is what we answer with otherwise.
        s.write_all(b"RFB 003.003\n").await?;
        let chosen = s.read_u32().await?;
        return match (chosen, password) {
            (0, _) => Err(fail(format!("the desktop refused: {}", reason(s).await?))),
            (1, _) => Ok(()),
            (2, Some(pw)) => challenge(s, pw, false).await,
            (2, None) => Err(fail("the desktop asks for a VNC password and none is kept for it (desktop add --password-file)")),
            (t, _) => Err(fail(format!("the desktop wants security type {t}, which the broker does not speak"))),
        };
    }
    s.write_all(VERSION).await?;
    let n = s.read_u8().await?;
    if n == 0 {
        return Err(fail(format!("the desktop refused: {}", reason(s).await?)));
    }
    let mut types = vec![0u8; usize::from(n)];
    s.read_exact(&mut types).await?;
    let pick = match password {
        Some(_) if types.contains(&SEC_VNC) => SEC_VNC,
        _ if types.contains(&SEC_NONE) => SEC_NONE,
        None if types.contains(&SEC_VNC) => {
            return Err(fail("the desktop asks for a VNC password and none is kept for it (desktop add --password-file)"))
        }
        _ => {
            return Err(fail(format!(
                "the desktop offers security types {types:?}; the broker speaks None (1) and VNC authentication (2)"
            )))
        }
    };
    s.write_u8(pick).await?;
    match (pick, password) {
        (SEC_VNC, Some(pw)) => challenge(s, pw, true).await,
        _ => result(s, true).await,
    }
}

async fn challenge<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    password: &[u8],
    with_reason: bool,
) -> std::io::Result<()> {
    let mut ch = [0u8; 16];
    s.read_exact(&mut ch).await?;
    s.write_all(&vnc_response(password, &ch)).await?;
    result(s, with_reason).await
}

async fn result<S: AsyncRead + Unpin>(s: &mut S, with_reason: bool) -> std::io::Result<()> {
    match s.read_u32().await? {
        0 => Ok(()),
        _ if with_reason => Err(fail(format!(
            "the desktop refused the password: {}",
            reason(s).await?
        ))),
        _ => Err(fail("the desktop refused the password")),
    }
}

/// What the browser side must receive before the desktop's bytes: the
/// server half of a 3.8 handshake offering "None". The browser's
/// answers (its version, its choice) are checked by [`browser_answer`].
pub(crate) fn greeting() -> &'static [u8] {
    VERSION
}

/// Checks the browser's version line and answers with the security list.
pub(crate) fn after_version(version: &[u8]) -> std::io::Result<&'static [u8]> {
    if version != VERSION && version != b"RFB 003.007\n" {
        return Err(fail(format!(
            "the browser's VNC client speaks {:?}; the console needs RFB 3.7 or 3.8",
            String::from_utf8_lossy(version).trim_end()
        )));
    }
    Ok(&[1, SEC_NONE])
}

/// Checks the browser's choice of security; what to send it then.
pub(crate) fn browser_answer(choice: u8) -> std::io::Result<&'static [u8]> {
    if choice != SEC_NONE {
        return Err(fail(format!("the browser chose security type {choice}")));
    }
    Ok(&[0, 0, 0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &str = "b866924125c8eebb9debc1db61c538e2";

    #[test]
    fn vnc_auth_matches_a_known_answer() {
        // DES-ECB of 00..0f under the mirrored key of "password"
        // (0e 86 ce ce ee f6 4e 26), as `openssl enc -des-ecb -nopad
        // -provider legacy` computes it; QEMU accepting the answer is
        // tested end to end (tests/broker_console.rs).
        let ch: [u8; 16] = core::array::from_fn(|i| i as u8);
        let a = vnc_response(b"password", &ch);
        assert_eq!(hex::encode(a), KNOWN);
        let b = vnc_response(b"password", &ch);
        assert_eq!(a, b);
        assert_ne!(a, vnc_response(b"passwore", &ch));
        // Bytes beyond 8 are ignored, as in every VNC server.
        assert_eq!(a, vnc_response(b"password-and-more", &ch));
    }

    #[tokio::test]
    async fn client_against_a_none_server() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let server = tokio::spawn(async move {
            b.write_all(VERSION).await.unwrap();
            let mut v = [0u8; 12];
            b.read_exact(&mut v).await.unwrap();
            assert_eq!(&v, VERSION);
            b.write_all(&[1, SEC_NONE]).await.unwrap();
            assert_eq!(b.read_u8().await.unwrap(), SEC_NONE);
            b.write_u32(0).await.unwrap();
        });
        client(&mut a, None).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn client_needs_a_password_for_vnc_auth() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            b.write_all(VERSION).await.unwrap();
            let mut v = [0u8; 12];
            b.read_exact(&mut v).await.unwrap();
            b.write_all(&[1, SEC_VNC]).await.unwrap();
            let _ = b.read_u8().await;
        });
        let e = client(&mut a, None).await.unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
    }

    #[test]
    fn browser_side() {
        assert_eq!(after_version(VERSION).unwrap(), &[1, SEC_NONE]);
        assert!(after_version(b"RFB 003.003\n").is_err());
        assert!(browser_answer(2).is_err());
        assert_eq!(browser_answer(1).unwrap(), &[0, 0, 0, 0]);
    }
}
