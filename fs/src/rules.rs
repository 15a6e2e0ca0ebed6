//! Redirection rules: which layer of a composition receives a write.
//!
//! A rules file is TOML holding an ordered list of `{ path, layer }` rules,
//! either as an array or as `[[rule]]` tables:
//!
//! ```toml
//! rules = [
//!   { path = "/home/*/Documents/**", layer = "data" },
//!   { path = "/home/**",             layer = "system" },
//!   { path = "**",                   layer = "personal" },
//! ]
//! ```
//!
//! Paths are globs over the absolute path inside the mount: `*` and `?`
//! stay within one path component, `**` spans any number, `[...]` and
//! `{a,b}` work as in shells. `/home/**` matches everything below `/home`
//! but not `/home` itself. The first matching rule decides; the last rule
//! must be `**`, so every path has a layer. `layer` names a kind (`os`,
//! `group`, `personal`, `system`, `data`; it must be unique in the
//! composition) or a layer by name.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{Error, Result};

/// One rule as written, with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSpec {
    /// Glob over the absolute path.
    pub path: String,
    /// Kind or layer name receiving the writes.
    pub layer: String,
    /// 1-based line in the rules file.
    pub line: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    path: String,
    layer: String,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn glob(pattern: &str) -> std::result::Result<globset::Glob, String> {
    if pattern != "**" && !pattern.starts_with('/') {
        return Err(format!(
            "path {pattern:?} must be absolute (start with '/') or be \"**\""
        ));
    }
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| format!("bad glob {pattern:?}: {}", e.kind()))
}

/// Parses a rules file. `file` names it in errors.
///
/// # Errors
/// [`Error::Rules`] with the line of a syntax error, an unknown key, a bad
/// glob, or a missing final `**` rule.
pub fn parse(text: &str, file: &str) -> Result<Vec<RuleSpec>> {
    let err = |line: usize, reason: String| Error::Rules {
        file: file.to_owned(),
        line,
        reason,
    };
    let parsed: RulesFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        err(line, e.message().trim().to_owned())
    })?;
    if !parsed.rules.is_empty() && !parsed.rule.is_empty() {
        let line = line_of(text, parsed.rule[0].span().start);
        return Err(err(
            line,
            "use either `rules = [...]` or `[[rule]]` tables, not both".into(),
        ));
    }
    let raw = if parsed.rules.is_empty() {
        parsed.rule
    } else {
        parsed.rules
    };
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        let line = line_of(text, r.span().start);
        let r = r.into_inner();
        glob(&r.path).map_err(|reason| err(line, reason))?;
        if r.layer.is_empty() {
            return Err(err(line, "empty layer".into()));
        }
        out.push(RuleSpec {
            path: r.path,
            layer: r.layer,
            line,
        });
    }
    match out.last() {
        Some(last) if last.path == "**" => Ok(out),
        Some(last) => Err(err(
            last.line,
            "the last rule must be `path = \"**\"`, the default layer for every other path".into(),
        )),
        None => Err(err(
            line_of(text, text.len()),
            "no rules; at least a final `{ path = \"**\", layer = ... }` is required".into(),
        )),
    }
}

/// What a rule may name: one writable slot of a composition.
pub struct Target<'a> {
    /// The slot's kind.
    pub kind: &'a str,
    /// Its layer's name.
    pub layer: &'a str,
    /// False for pinned (read-only) slots.
    pub writable: bool,
}

/// Compiled rules: glob set plus the slot each rule routes to.
#[derive(Debug, Clone)]
pub struct Rules {
    set: GlobSet,
    slots: Vec<usize>,
}

impl Rules {
    /// Resolves each rule's layer among `targets` (slot order) and compiles
    /// the globs.
    ///
    /// # Errors
    /// [`Error::Rules`] naming the line of a rule whose layer the composition
    /// lacks, holds more than once (name the layer instead), or pins.
    pub fn compile(specs: &[RuleSpec], targets: &[Target<'_>], file: &str) -> Result<Rules> {
        let mut b = GlobSetBuilder::new();
        let mut slots = Vec::with_capacity(specs.len());
        for spec in specs {
            let err = |reason: String| Error::Rules {
                file: file.to_owned(),
                line: spec.line,
                reason,
            };
            let by_kind: Vec<usize> = (0..targets.len())
                .filter(|&i| targets[i].kind == spec.layer)
                .collect();
            let slot = match by_kind.as_slice() {
                [one] => *one,
                [] => match targets.iter().position(|t| t.layer == spec.layer) {
                    Some(i) => i,
                    None => {
                        return Err(err(format!(
                            "layer {:?} is not in the composition (it has: {})",
                            spec.layer,
                            targets
                                .iter()
                                .map(|t| format!("{}={}", t.kind, t.layer))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )))
                    }
                },
                many => {
                    return Err(err(format!(
                        "the composition has {} {} layers; name one ({})",
                        many.len(),
                        spec.layer,
                        many.iter()
                            .map(|&i| format!("layer = {:?}", targets[i].layer))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    )))
                }
            };
            if !targets[slot].writable {
                return Err(err(format!(
                    "layer {} is pinned to a version, so it is read-only and cannot receive writes",
                    targets[slot].layer
                )));
            }
            b.add(glob(&spec.path).map_err(err)?);
            slots.push(slot);
        }
        let set = b.build().map_err(|e| Error::Rules {
            file: file.to_owned(),
            line: 1,
            reason: e.to_string(),
        })?;
        Ok(Rules { set, slots })
    }

    /// A rule set sending every write to `slot`.
    pub fn single(slot: usize) -> Rules {
        let mut b = GlobSetBuilder::new();
        // "**" always compiles.
        if let Ok(g) = glob("**") {
            b.add(g);
        }
        Rules {
            set: b.build().unwrap_or_else(|_| GlobSet::empty()),
            slots: vec![slot],
        }
    }

    /// The slot receiving writes to `path` (absolute, e.g. `/etc/hostname`).
    pub fn route(&self, path: &[u8]) -> usize {
        let p = Path::new(OsStr::from_bytes(path));
        self.set
            .matches(p)
            .first()
            .and_then(|&i| self.slots.get(i))
            .or(self.slots.last())
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
rules = [
  { path = "/home/*/Documents/**", layer = "data" },
  { path = "/home/**", layer = "system" },
  { path = "/etc/hostname", layer = "system" },
  { path = "**", layer = "personal" },
]
"#;

    fn targets() -> Vec<Target<'static>> {
        vec![
            Target {
                kind: "os",
                layer: "os/base",
                writable: false,
            },
            Target {
                kind: "personal",
                layer: "u/apps",
                writable: true,
            },
            Target {
                kind: "system",
                layer: "u/sys",
                writable: true,
            },
            Target {
                kind: "data",
                layer: "u/data",
                writable: true,
            },
        ]
    }

    #[test]
    fn routes_first_match() {
        let specs = parse(EXAMPLE, "r.toml").unwrap();
        assert_eq!(specs.len(), 4);
        assert_eq!(specs[0].line, 3);
        let rules = Rules::compile(&specs, &targets(), "r.toml").unwrap();
        assert_eq!(rules.route(b"/home/alice/Documents/a/b.txt"), 3);
        assert_eq!(rules.route(b"/home/alice/Documents/x"), 3);
        assert_eq!(rules.route(b"/home/alice/.bashrc"), 2);
        assert_eq!(rules.route(b"/home/alice"), 2);
        // `/home/**` is below /home only.
        assert_eq!(rules.route(b"/home"), 1);
        assert_eq!(rules.route(b"/etc/hostname"), 2);
        assert_eq!(rules.route(b"/etc/hosts"), 1);
        assert_eq!(rules.route(b"/usr/bin/x"), 1);
        // `*` stays within a component.
        assert_eq!(rules.route(b"/home/a/b/Documents/x"), 2);
    }

    #[test]
    fn table_form() {
        let text = "[[rule]]\npath = \"/srv/**\"\nlayer = \"data\"\n\n[[rule]]\npath = \"**\"\nlayer = \"personal\"\n";
        let specs = parse(text, "r").unwrap();
        assert_eq!(specs[1].line, 5);
        let rules = Rules::compile(&specs, &targets(), "r").unwrap();
        assert_eq!(rules.route(b"/srv/x"), 3);
    }

    fn line_and_reason(r: Result<Vec<RuleSpec>>) -> (usize, String) {
        match r {
            Err(Error::Rules { line, reason, .. }) => (line, reason),
            other => panic!("expected a rules error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_lines() {
        let (line, reason) = line_and_reason(parse(
            "rules = [\n { path = \"/a/[b\", layer = \"data\" },\n { path = \"**\", layer = \"data\" },\n]\n",
            "r",
        ));
        assert_eq!(line, 2);
        assert!(reason.contains("bad glob"), "{reason}");

        let (line, reason) = line_and_reason(parse(
            "rules = [\n { path = \"/a/**\", layer = \"data\" },\n]\n",
            "r",
        ));
        assert_eq!(line, 2);
        assert!(reason.contains("last rule"), "{reason}");

        let (line, _) = line_and_reason(parse(
            "rules = [\n { path = \"**\" layer = \"x\" },\n]\n",
            "r",
        ));
        assert_eq!(line, 2);

        let (line, reason) = line_and_reason(parse(
            "rules = [\n { path = \"**\", layer = \"data\", extra = 1 },\n]\n",
            "r",
        ));
        assert_eq!(line, 2, "{reason}");

        let (line, reason) = line_and_reason(parse(
            "rules = [\n { path = \"relative/**\", layer = \"data\" },\n { path = \"**\", layer = \"data\" },\n]\n",
            "r",
        ));
        assert_eq!(line, 2);
        assert!(reason.contains("absolute"), "{reason}");

        let (_, reason) = line_and_reason(parse("# nothing\n", "r"));
        assert!(reason.contains("no rules"), "{reason}");
    }

    #[test]
    fn compile_errors() {
        let specs = parse(
            "rules = [\n{ path = \"/x\", layer = \"group\" },\n{ path = \"**\", layer = \"data\" },\n]",
            "r",
        )
        .unwrap();
        match Rules::compile(&specs, &targets(), "r") {
            Err(Error::Rules {
                line: 2, reason, ..
            }) => {
                assert!(reason.contains("not in the composition"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let specs = parse("rules = [\n{ path = \"**\", layer = \"os\" },\n]", "r").unwrap();
        match Rules::compile(&specs, &targets(), "r") {
            Err(Error::Rules {
                line: 2, reason, ..
            }) => {
                assert!(reason.contains("pinned"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let mut two_groups = targets();
        two_groups.insert(
            1,
            Target {
                kind: "group",
                layer: "g/one",
                writable: true,
            },
        );
        two_groups.insert(
            2,
            Target {
                kind: "group",
                layer: "g/two",
                writable: true,
            },
        );
        let specs = parse("rules = [\n{ path = \"**\", layer = \"group\" },\n]", "r").unwrap();
        match Rules::compile(&specs, &two_groups, "r") {
            Err(Error::Rules { reason, .. }) => assert!(reason.contains("name one"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let specs = parse("rules = [\n{ path = \"**\", layer = \"g/two\" },\n]", "r").unwrap();
        let rules = Rules::compile(&specs, &two_groups, "r").unwrap();
        assert_eq!(rules.route(b"/x"), 2);
    }
}
