//! The console's HTML: one small stylesheet, server-rendered pages, one
//! module script (the screen). Everything user-supplied goes through
//! [`esc`].

use std::fmt::Write as _;

use crate::api::PoolView;
use crate::audit::AuditEntry;
use crate::desktop::ExternalDesktop;
use crate::model::{Session, Subscription};

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f4f6f9}
header{display:flex;gap:1.2em;align-items:center;background:#1d2330;color:#fff;padding:.6em 1.2em}
header a{color:#cfe0ff;text-decoration:none}header .me{margin-left:auto}
header form{display:inline;margin:0}
main{padding:1em 1.2em;max-width:72em}
table{border-collapse:collapse;margin:.4em 0 1.4em;background:#fff}
th,td{border:1px solid #d5dae3;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#e9edf3}
button,input[type=submit]{background:#2458c6;color:#fff;border:0;border-radius:4px;padding:.35em .9em;cursor:pointer}
button.quiet{background:#6b7385}
.err{background:#fde8e8;border:1px solid #e0a0a0;padding:.6em 1em;border-radius:4px}
.ok{color:#116b2e}.bad{color:#a11}
textarea{width:100%;min-height:14em;font:13px monospace}
form.inline{display:inline}
.card{background:#fff;border:1px solid #d5dae3;border-radius:6px;padding:.8em 1em;margin:.6em 0;display:flex;gap:1em;align-items:center}
.card .what{flex:1}
body.screen{background:#000;overflow:hidden;display:flex;flex-direction:column;height:100vh}
body.screen header{padding:.3em 1em;font-size:13px}
body.screen main{flex:1;display:flex;flex-direction:column;padding:0;max-width:none;min-height:0}
#bar{flex:none;display:flex;gap:1em;align-items:center;padding:.25em 1em;background:#111;color:#ddd;font-size:13px}
#screen{flex:1;position:relative;min-height:0}
";

/// What every page needs.
pub struct Frame<'a> {
    /// Page title.
    pub title: &'a str,
    /// The logged-in user and whether they are an admin.
    pub user: Option<(&'a str, bool)>,
    /// The login's CSRF token.
    pub csrf: &'a str,
    /// This response's CSP nonce.
    pub nonce: &'a str,
    /// `<body>` class.
    pub class: &'a str,
}

/// A whole page around `body`.
pub fn page(f: &Frame<'_>, body: &str) -> String {
    let mut nav = String::new();
    if let Some((user, admin)) = f.user {
        nav.push_str("<a href=\"/console\">Desktops</a>");
        if admin {
            nav.push_str(
                "<a href=\"/console/admin\">Admin</a><a href=\"/console/admin/audit\">Audit</a>",
            );
        }
        let _ = write!(
            nav,
            "<span class=\"me\">{}</span><form method=\"post\" action=\"/console/logout\">{}<button class=\"quiet\" id=\"logout\">Log out</button></form>",
            esc(user),
            csrf_field(f.csrf)
        );
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{title} · Lamina</title><style nonce=\"{nonce}\">{STYLE}</style></head>\
<body class=\"{class}\"><header><strong>Lamina</strong>{nav}</header><main>{body}</main></body></html>",
        title = esc(f.title),
        nonce = f.nonce,
        class = f.class,
    )
}

/// The hidden CSRF input of a form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// The login form, with an error above it if any.
pub fn login(error: Option<&str>) -> String {
    let err = error
        .map(|e| format!("<p class=\"err\" id=\"error\">{}</p>", esc(e)))
        .unwrap_or_default();
    format!(
        "<h1>Log in</h1>{err}<form method=\"post\" action=\"/console/login\">\
<p><label>User <input name=\"user\" id=\"user\" autocomplete=\"username\" required></label></p>\
<p><label>Password <input name=\"password\" id=\"password\" type=\"password\" autocomplete=\"current-password\" required></label></p>\
<p><button id=\"login\">Log in</button></p></form>"
    )
}

/// An error page's body.
pub fn error(message: &str) -> String {
    format!(
        "<p class=\"err\" id=\"error\">{}</p><p><a href=\"/console\">Back</a></p>",
        esc(message)
    )
}

fn profile_of(p: &PoolView) -> Option<&str> {
    p.vms.iter().flatten().find_map(|m| m.profile.as_deref())
}

/// A user's home: their pools (those fitting the device first) and open
/// sessions.
pub fn home(
    csrf: &str,
    device: &super::device::Device,
    pools: &[(PoolView, Option<String>)],
    sessions: &[Session],
    nonce: &str,
) -> String {
    let mut b = format!(
        "<h1>Your desktops</h1><p>This device: <b id=\"device\">{}</b> (screens for the <b>{}</b> profile fit it best).</p>",
        esc(&device.name),
        esc(&device.profile)
    );
    if !sessions.is_empty() {
        b.push_str("<h2>Open</h2>");
        for s in sessions {
            let _ = write!(
                b,
                "<div class=\"card session\" data-session=\"{id}\"><div class=\"what\"><b>{pool}</b> · {vm}</div>\
<a href=\"/console/screen/{id}\"><button type=\"button\" class=\"open\">Open screen</button></a>\
<form class=\"inline\" method=\"post\" action=\"/console/sessions/{id}/end\">{c}<button class=\"quiet end\">Disconnect</button></form></div>",
                id = esc(&s.id),
                pool = esc(&s.pool),
                vm = esc(&s.vm),
                c = csrf_field(csrf)
            );
        }
    }
    b.push_str("<h2>Pools</h2>");
    if pools.is_empty() {
        b.push_str("<p>You are not subscribed to any pool.</p>");
    }
    for (p, profile) in pools {
        let fits = profile.as_deref() == Some(device.profile.as_str());
        let _ = write!(
            b,
            "<div class=\"card pool\" data-pool=\"{name}\"><div class=\"what\"><b>{name}</b> · {profile}{fits} · {idle} idle of {total}</div>\
<form class=\"inline connect\" method=\"post\" action=\"/console/pools/{name}/connect\">{c}\
<input type=\"hidden\" name=\"vw\" value=\"\"><input type=\"hidden\" name=\"vh\" value=\"\">\
<button id=\"connect-{name}\">Connect</button></form></div>",
            name = esc(&p.pool.name),
            profile = esc(profile.as_deref().unwrap_or("screen")),
            fits = if fits { " (fits this device)" } else { "" },
            idle = p.counts.idle,
            total = p.counts.total,
            c = csrf_field(csrf)
        );
    }
    // The viewport travels with the connect, for the device table.
    let _ = write!(
        b,
        "<script nonce=\"{nonce}\">for(const f of document.querySelectorAll('form.connect')){{f.vw.value=innerWidth;f.vh.value=innerHeight;}}</script>"
    );
    b
}

/// The screen page: noVNC over the proxy's WebSocket.
pub fn screen(
    session: &Session,
    ticket: &str,
    device: &super::device::Device,
    width: u32,
    height: u32,
    csrf: &str,
    nonce: &str,
) -> String {
    format!(
        "\
<div id=\"bar\"><span id=\"status\" data-device=\"{dev}\" data-profile=\"{prof}\" data-width=\"{width}\" data-height=\"{height}\">connecting to {vm}…</span>\
<form class=\"inline\" method=\"post\" action=\"/console/sessions/{id}/end\">{c}<button class=\"quiet\" id=\"disconnect\">Disconnect</button></form></div>\
<div id=\"screen\" data-ticket=\"{ticket}\"></div>\
<script type=\"module\" nonce=\"{nonce}\">\
import RFB from '/console/novnc/core/rfb.js';\
const el=document.getElementById('screen'),st=document.getElementById('status');\
const url=(location.protocol==='https:'?'wss://':'ws://')+location.host+'/console/ws?ticket='+el.dataset.ticket;\
const rfb=new RFB(el,url,{{wsProtocols:['binary']}});\
rfb.scaleViewport=true;rfb.focusOnClick=true;\
rfb.addEventListener('connect',()=>{{document.body.dataset.state='connected';st.textContent='{vm} · '+st.dataset.device+' · '+st.dataset.width+'×'+st.dataset.height;rfb.focus();}});\
rfb.addEventListener('disconnect',e=>{{document.body.dataset.state='disconnected';st.textContent='disconnected from {vm}'+(e.detail.clean?'':' (connection lost)');}});\
window.laminaRfb=rfb;\
</script>",
        dev = esc(&device.name),
        prof = esc(&device.profile),
        vm = esc(&session.vm),
        id = esc(&session.id),
        ticket = esc(ticket),
        c = csrf_field(csrf),
    )
}

/// What the admin page shows.
pub struct AdminView<'a> {
    /// Hosts: name, URL, status line.
    pub hosts: Vec<(String, String, String)>,
    /// Pools with their VMs.
    pub pools: &'a [PoolView],
    /// Every open session.
    pub sessions: &'a [Session],
    /// Users: name, admin, groups, has a console password.
    pub users: Vec<(String, bool, Vec<String>, bool)>,
    /// Subscriptions.
    pub subs: &'a [Subscription],
    /// External desktops.
    pub desktops: &'a [ExternalDesktop],
    /// The device table as TOML.
    pub devices: String,
    /// Each VM's network peripherals, one line each ("lp: printer lp0,
    /// connect tcp:…, connected"), by VM name.
    pub peripherals: std::collections::HashMap<String, Vec<String>>,
}

fn row(cells: &[String]) -> String {
    let mut r = String::from("<tr>");
    for c in cells {
        let _ = write!(r, "<td>{c}</td>");
    }
    r.push_str("</tr>");
    r
}

fn head(cells: &[&str]) -> String {
    let mut r = String::from("<tr>");
    for c in cells {
        let _ = write!(r, "<th>{c}</th>");
    }
    r.push_str("</tr>");
    r
}

/// The admin page.
pub fn admin(v: &AdminView<'_>, csrf: &str) -> String {
    let mut b = String::from("<h1>Admin</h1><h2>Hosts</h2><table id=\"hosts\">");
    b.push_str(&head(&["host", "agent", "status"]));
    for (n, u, s) in &v.hosts {
        b.push_str(&row(&[esc(n), esc(u), esc(s)]));
    }
    b.push_str("</table><h2>Pools</h2>");
    for p in v.pools {
        let _ = write!(
            b,
            "<h3>{name}</h3><p>template {t} over {base} · rules now: {lim} · {idle} idle, {used} in use, {total} in all · <a href=\"/console/admin/pools/{name}/rules\">rules</a></p><table class=\"vms\">",
            name = esc(&p.pool.name),
            t = esc(&p.pool.template),
            base = esc(&p.pool.base),
            lim = esc(&p.limits.to_string()),
            idle = p.counts.idle,
            used = p.counts.in_use,
            total = p.counts.total,
        );
        b.push_str(&head(&[
            "VM",
            "state",
            "host",
            "user",
            "CPU %",
            "RSS MiB",
            "peripherals",
        ]));
        for m in p.vms.iter().flatten() {
            let periph = v.peripherals.get(&m.name).map_or_else(String::new, |l| {
                l.iter().map(|x| esc(x)).collect::<Vec<_>>().join("<br>")
            });
            b.push_str(&row(&[
                esc(&m.name),
                esc(&m.state.to_string()),
                esc(m.vnc.as_deref().map_or(m.host.as_str(), |_| "external")),
                esc(m.owner.as_deref().unwrap_or("")),
                m.cpu_percent.map(|c| format!("{c:.0}")).unwrap_or_default(),
                m.rss_bytes
                    .map(|r| format!("{}", r / (1024 * 1024)))
                    .unwrap_or_default(),
                periph,
            ]));
        }
        b.push_str("</table>");
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/console/admin/pools/{name}/subscribe\">{c}<input name=\"principal\" placeholder=\"user or @group\" required> <button>Subscribe</button></form>",
            name = esc(&p.pool.name),
            c = csrf_field(csrf)
        );
    }
    b.push_str("<h2>Sessions</h2><table id=\"sessions\">");
    b.push_str(&head(&["session", "user", "pool", "VM", "since", ""]));
    for s in v.sessions {
        let since = chrono::DateTime::from_timestamp_nanos(s.started_ns)
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string();
        b.push_str(&row(&[
            esc(&s.id),
            esc(&s.user),
            esc(&s.pool),
            esc(&s.vm),
            since,
            format!(
                "<form class=\"inline\" method=\"post\" action=\"/console/sessions/{}/end\">{}<button class=\"quiet\">Force disconnect</button></form>",
                esc(&s.id),
                csrf_field(csrf)
            ),
        ]));
    }
    b.push_str("</table><h2>Users</h2><table id=\"users\">");
    b.push_str(&head(&["user", "admin", "groups", "console password"]));
    for (n, a, g, pw) in &v.users {
        b.push_str(&row(&[
            esc(n),
            if *a { "yes".into() } else { String::new() },
            esc(&g.join(", ")),
            if *pw { "set".into() } else { "none".into() },
        ]));
    }
    b.push_str("</table><h2>Subscriptions</h2><table id=\"subscriptions\">");
    b.push_str(&head(&["pool", "who", ""]));
    for s in v.subs {
        b.push_str(&row(&[
            esc(&s.pool),
            esc(&s.principal),
            format!(
                "<form class=\"inline\" method=\"post\" action=\"/console/admin/pools/{}/unsubscribe\">{}<input type=\"hidden\" name=\"principal\" value=\"{}\"><button class=\"quiet\">Withdraw</button></form>",
                esc(&s.pool),
                csrf_field(csrf),
                esc(&s.principal)
            ),
        ]));
    }
    b.push_str("</table><h2>External desktops</h2><table id=\"desktops\">");
    b.push_str(&head(&["desktop", "pool", "VNC", "password", "user"]));
    for d in v.desktops {
        b.push_str(&row(&[
            esc(&d.name),
            esc(&d.pool),
            esc(&d.vnc),
            if d.password {
                "kept".into()
            } else {
                "none".into()
            },
            esc(d.owner.as_deref().unwrap_or("")),
        ]));
    }
    let _ = write!(
        b,
        "</table><h2>Devices</h2><form method=\"post\" action=\"/console/admin/devices\">{}<textarea name=\"toml\" id=\"devices\">{}</textarea><p><button>Save the device table</button></p></form>",
        csrf_field(csrf),
        esc(&v.devices)
    );
    b
}

/// A pool's rules editor.
pub fn rules(pool: &str, toml: &str, csrf: &str, note: Option<&str>) -> String {
    let note = note
        .map(|n| format!("<p class=\"err\" id=\"error\">{}</p>", esc(n)))
        .unwrap_or_default();
    format!(
        "<h1>Rules of {p}</h1>{note}<form method=\"post\" action=\"/console/admin/pools/{p}/rules\">{c}<textarea name=\"toml\" id=\"rules\">{t}</textarea><p><button id=\"save\">Save</button></p></form>",
        p = esc(pool),
        c = csrf_field(csrf),
        t = esc(toml)
    )
}

/// The audit log, newest first.
pub fn audit(entries: &[AuditEntry]) -> String {
    let mut b = String::from("<h1>Audit log</h1><table id=\"audit\">");
    b.push_str(&head(&["when", "who", "action", "target", "", "detail"]));
    for e in entries.iter().rev().take(1000) {
        let when = chrono::DateTime::from_timestamp_nanos(e.at_ns)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string();
        b.push_str(&row(&[
            when,
            esc(&e.actor),
            esc(&e.action),
            esc(&e.target),
            if e.ok {
                "<span class=\"ok\">ok</span>".into()
            } else {
                "<span class=\"bad\">failed</span>".into()
            },
            esc(&e.detail),
        ]));
    }
    b.push_str("</table>");
    b
}

/// The profile a pool's VMs show, from the VMs an admin view lists.
pub fn pool_profile(p: &PoolView) -> Option<String> {
    profile_of(p).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }

    #[test]
    fn pages_escape_what_users_typed() {
        let body = login(Some("<script>alert(1)</script>"));
        assert!(!body.contains("<script>alert"));
        let f = Frame {
            title: "<t>",
            user: Some(("<u>", true)),
            csrf: "c\"s",
            nonce: "n",
            class: "",
        };
        let p = page(&f, "");
        assert!(p.contains("&lt;t&gt;") && p.contains("&lt;u&gt;") && p.contains("c&quot;s"));
    }
}
