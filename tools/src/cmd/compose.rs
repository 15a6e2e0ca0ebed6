//! `lamina compose ...`, `lamina mount`, `umount`, `status`, `commit`.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

use anyhow::Context;
use lamina_fs::compose::{self, Composition};
use lamina_fs::{CreateOptions, LayerArg, Mode};
use lamina_sync::Access;
use serde_json::json;

use crate::cli::{Cli, CommitArgs, ComposeCommand, ComposeCreateArgs, MountArgs};
use crate::cmd::{default_author, open, store_path};
use crate::output::{bytes, time, Out, UsageError};
use crate::progress::Bar;

pub fn run(cli: &Cli, out: &Out, c: &ComposeCommand) -> anyhow::Result<ExitCode> {
    match c {
        ComposeCommand::Create(a) => create(cli, out, a),
        ComposeCommand::Ls => ls(cli, out),
        ComposeCommand::Show { name } => show(cli, out, name),
        ComposeCommand::Rm { name } => rm(cli, out, name),
        ComposeCommand::Reset { name } => reset(cli, out, name),
    }?;
    Ok(ExitCode::SUCCESS)
}

fn create(cli: &Cli, out: &Out, a: &ComposeCreateArgs) -> anyhow::Result<()> {
    let mut layers = a
        .layers
        .iter()
        .map(|s| s.parse::<LayerArg>())
        .collect::<Result<Vec<_>, _>>()?;
    let remote_layer = |l: &LayerArg| {
        l.layer
            .split_once(':')
            .map(|(r, n)| (r.to_owned(), n.to_owned()))
    };
    if !a.stream {
        if let Some(l) = layers.iter().find(|l| remote_layer(l).is_some()) {
            return Err(UsageError(format!(
                "--layer {}={}: a REMOTE:LAYER streams only with --stream (or pull it first)",
                l.kind, l.layer
            ))
            .into());
        }
    }
    let mode: Mode = a.mode.parse()?;
    let rules = match &a.rules {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| UsageError(format!("rules file {}: {e}", p.display())))?;
            Some((text, p.display().to_string()))
        }
        None => None,
    };
    let store = open(cli, out, Access::Write)?;
    let mut streamed = Vec::new();
    for l in &mut layers {
        let Some((remote, name)) = remote_layer(l) else {
            continue;
        };
        let spec = l.version.take().unwrap_or_else(|| "head".into());
        let (sv, _, _) =
            store.stream_manifests(&remote, &name, &spec, lamina_sync::LayerFormat::Tree)?;
        l.layer = name;
        streamed.push(sv);
    }
    let comp = compose::create(
        &store,
        &CreateOptions {
            name: a.name.clone(),
            layers,
            rules,
            mode,
            streamed,
        },
    )?;
    out.result(&comp_doc(&comp, None), || {
        format!(
            "created composition {} ({}; {})",
            comp.name,
            lamina_fs::describe(&comp).join(" "),
            comp.mode.as_str()
        )
    })
}

/// A composition as JSON, with where it is mounted.
fn comp_doc(comp: &Composition, mount: Option<&lamina_fs::MountInfo>) -> serde_json::Value {
    json!({
        "name": comp.name,
        "mode": comp.mode.as_str(),
        "layers": comp.slots.iter().map(|s| json!({
            "kind": s.kind.to_string(),
            "layer": s.layer,
            "pin": s.pin.map(|v| v.to_string()),
            "writable": s.writable(),
        })).collect::<Vec<_>>(),
        "rules": comp.rules.iter().map(|r| json!({
            "path": r.path, "layer": r.layer, "line": r.line,
        })).collect::<Vec<_>>(),
        "rules_file": comp.rules_file,
        "created": time(comp.created_ns),
        "mounted": mount.map(|m| json!({
            "dir": m.dir, "pid": m.pid, "since": time(m.started_ns),
        })),
    })
}

fn ls(cli: &Cli, out: &Out) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let comps = compose::list(&store)?;
    let rows: Vec<_> = comps
        .iter()
        .map(|c| (c, lamina_fs::mounted(store.root(), c)))
        .collect();
    let doc: Vec<_> = rows.iter().map(|(c, m)| comp_doc(c, m.as_ref())).collect();
    out.result(&doc, || {
        let mut s = String::new();
        for (c, m) in &rows {
            let at = m
                .as_ref()
                .map(|m| format!("  mounted at {}", m.dir.display()))
                .unwrap_or_default();
            s.push_str(&format!(
                "{}\t{}\t{}{at}\n",
                c.name,
                c.mode.as_str(),
                lamina_fs::describe(c).join(" ")
            ));
        }
        s
    })
}

fn show(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    let comp = compose::get(&store, name)?;
    let m = lamina_fs::mounted(store.root(), &comp);
    out.result(&comp_doc(&comp, m.as_ref()), || {
        let mut s = format!(
            "composition {}\nmode        {}\n",
            comp.name,
            comp.mode.as_str()
        );
        s.push_str(&format!("created     {}\n", time(comp.created_ns)));
        match &m {
            Some(m) => s.push_str(&format!(
                "mounted     {} (pid {}, since {})\n",
                m.dir.display(),
                m.pid,
                time(m.started_ns)
            )),
            None => s.push_str("mounted     no\n"),
        }
        s.push_str("layers (bottom to top):\n");
        for slot in &comp.slots {
            let v = match slot.pin {
                Some(v) => format!("@{} (pinned, read-only)", v.short()),
                None => "(follows head)".into(),
            };
            s.push_str(&format!(
                "  {:<9} {} {v}\n",
                slot.kind.to_string(),
                slot.layer
            ));
        }
        if comp.rules.is_empty() {
            s.push_str("rules: every write goes to the top writable layer\n");
        } else {
            s.push_str(&format!(
                "rules ({}):\n",
                comp.rules_file.as_deref().unwrap_or("inline")
            ));
            for r in &comp.rules {
                s.push_str(&format!("  {:<30} -> {}\n", r.path, r.layer));
            }
        }
        s
    })
}

fn rm(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Write)?;
    compose::remove(&store, name)?;
    out.result(&json!({"removed": name}), || {
        format!("removed composition {name}")
    })
}

fn reset(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<()> {
    let store = open(cli, out, Access::Read)?;
    lamina_fs::reset(&store, name)?;
    out.result(&json!({"reset": name}), || {
        format!("dropped the pending changes of {name}")
    })
}

/// `lamina mount`: by default starts a daemon (this program again, with
/// `--daemon-child`) and returns once it reports the mount ready.
pub fn mount(cli: &Cli, out: &Out, a: &MountArgs) -> anyhow::Result<ExitCode> {
    if a.foreground {
        let store = Arc::new(open(cli, out, Access::Serve)?);
        let m = lamina_fs::mount(store, &a.name, &a.dir)?;
        out.note(&format!(
            "mounted {} at {} (Ctrl-C or `lamina umount` to stop)",
            a.name,
            m.dir().display()
        ));
        m.run()?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.daemon_child {
        return daemon_child(cli, out, a);
    }
    spawn_daemon(cli, out, a)
}

fn spawn_daemon(cli: &Cli, out: &Out, a: &MountArgs) -> anyhow::Result<ExitCode> {
    let store_dir = std::path::absolute(store_path(cli)?)?;
    let dir = std::path::absolute(&a.dir)?;
    // Check what can be checked here so the common mistakes need no
    // daemon round trip; the daemon checks again.
    let log = {
        let store = open(cli, out, Access::Read)?;
        let comp = compose::get(&store, &a.name)?;
        comp.dir(store.root()).join("daemon.log")
    };
    crate::cmd::hotel::touch(cli, out, |store| {
        Ok(compose::get(store, &a.name)?
            .slots
            .into_iter()
            .map(|s| s.layer)
            .collect())
    });
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening daemon log {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the lamina executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--store").arg(&store_dir);
    if cli.no_wait {
        cmd.arg("--no-wait");
    }
    cmd.arg("mount")
        .arg(&a.name)
        .arg(&dir)
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let stdout = child
        .stdout
        .take()
        .context("the mount daemon has no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let doc: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or(json!(null));
    if let Some(m) = doc.get("mounted") {
        out.result(&json!({"mounted": m}), || {
            format!(
                "mounted {} at {} (daemon pid {}, log {})",
                a.name,
                dir.display(),
                m.get("pid").and_then(|p| p.as_u64()).unwrap_or(0),
                log.display()
            )
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    // The daemon failed before serving; reap it for its exit code.
    let status = child.wait()?;
    let code = status.code().unwrap_or(1).clamp(1, 255) as u8;
    let message = doc
        .get("error")
        .and_then(|e| e.get("message"))
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("the mount daemon exited ({status}); see {}", log.display()));
    eprintln!("error: {message}");
    if out.json {
        let kind = doc
            .get("error")
            .and_then(|e| e.get("kind"))
            .cloned()
            .unwrap_or(json!("error"));
        println!("{}", json!({"error": {"kind": kind, "message": message}}));
    }
    Ok(ExitCode::from(code))
}

fn daemon_child(cli: &Cli, out: &Out, a: &MountArgs) -> anyhow::Result<ExitCode> {
    // Our own session: the terminal's signals and hangup don't reach us.
    let _ = nix::unistd::setsid();
    let ready = (|| {
        let store = Arc::new(open(cli, out, Access::Serve)?);
        let m = lamina_fs::mount(store, &a.name, &a.dir)?;
        anyhow::Ok(m)
    })();
    let m = match ready {
        Ok(m) => m,
        Err(e) => {
            // The parent prints it; the log keeps it too.
            let kind = if crate::exit_code(&e) == 2 { 2 } else { 1 };
            tracing::error!("mount failed: {e:#}");
            let doc = json!({"error": {"kind": crate::output::error_kind(&e), "message": format!("{e:#}")}});
            println!("{doc}");
            return Ok(ExitCode::from(kind));
        }
    };
    let info = json!({"mounted": {
        "name": a.name, "dir": m.dir(), "pid": std::process::id(),
    }});
    {
        let mut so = std::io::stdout().lock();
        writeln!(so, "{info}")?;
        so.flush()?;
    }
    // Detach from the parent's pipe so it sees EOF, and from its cwd.
    let null = std::fs::File::options().write(true).open("/dev/null")?;
    nix::unistd::dup2_stdout(&null)?;
    let _ = std::env::set_current_dir("/");
    tracing::info!(dir = %m.dir().display(), "serving");
    m.run()?;
    tracing::info!("unmounted");
    Ok(ExitCode::SUCCESS)
}

pub fn umount(cli: &Cli, out: &Out, dir: &Path) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let name = lamina_fs::umount(&store, dir)?;
    out.result(
        &json!({"unmounted": dir, "composition": name}),
        || match &name {
            Some(n) => format!("unmounted {n} from {}", dir.display()),
            None => format!("unmounted {}", dir.display()),
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn status(cli: &Cli, out: &Out, name: &str) -> anyhow::Result<ExitCode> {
    let store = open(cli, out, Access::Read)?;
    let changes = lamina_fs::status(&store, name)?;
    out.result(&changes, || {
        let mut s = String::new();
        for c in &changes {
            let n = c.added.len() + c.changed.len() + c.deleted.len();
            if n == 0 {
                s.push_str(&format!("{} ({}): no changes\n", c.layer, c.kind));
                continue;
            }
            s.push_str(&format!(
                "{} ({}): {} added, {} changed, {} deleted\n",
                c.layer,
                c.kind,
                c.added.len(),
                c.changed.len(),
                c.deleted.len()
            ));
            for p in &c.added {
                s.push_str(&format!("  A {p}\n"));
            }
            for p in &c.changed {
                s.push_str(&format!("  M {p}\n"));
            }
            for p in &c.deleted {
                s.push_str(&format!("  D {p}\n"));
            }
        }
        s
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn commit(cli: &Cli, out: &Out, a: &CommitArgs) -> anyhow::Result<ExitCode> {
    let author = a.author.clone().unwrap_or_else(default_author);
    // A mounted composition is committed by its daemon (which needs the
    // store's writer lock itself): ask it first.
    let mounted = {
        let store = open(cli, out, Access::Read)?;
        lamina_fs::commit_mounted(&store, &a.name, a.message.as_deref(), &author)?
    };
    let report = match mounted {
        Some(r) => r,
        None => {
            let store = open(cli, out, Access::Write)?;
            let bar = Bar::new(out.progress_allowed());
            lamina_fs::commit(&store, &a.name, a.message.as_deref(), &author, &bar)?
        }
    };
    out.result(&report, || {
        let mut s = String::new();
        for l in &report.layers {
            match l.version {
                Some(v) => s.push_str(&format!("{}\t{}\n", l.layer, v)),
                None => s.push_str(&format!("{}\tunchanged\n", l.layer)),
            }
        }
        s
    })?;
    out.summary(&format!(
        "{}: read {}, {} new chunks",
        report.composition,
        bytes(report.bytes_read),
        report.chunks_new
    ));
    for b in &report.busy {
        out.note(&format!(
            "{b}: changed while being read, left for the next commit"
        ));
    }
    for c in &report.conflicts {
        out.note(&format!(
            "{}: the head had moved; merged with {} conflicts ({}, conflict {})",
            c.layer,
            c.items.len(),
            c.policy,
            c.id
        ));
    }
    Ok(ExitCode::SUCCESS)
}
