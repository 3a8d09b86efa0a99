//! Layered TOML configuration: defaults, then a config file, then
//! `--set dotted.key=value` overrides. Every key must already exist in the
//! defaults, so a typo is an error that lists the valid keys instead of a
//! silently ignored setting.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Every dotted leaf path of a table (`train.lr`, `model.unet.depth`, ...).
pub fn leaf_keys(table: &Table) -> Vec<String> {
    fn walk(prefix: &str, table: &Table, out: &mut Vec<String>) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Table(t) => walk(&path, t, out),
                _ => out.push(path),
            }
        }
    }
    let mut out = Vec::new();
    walk("", table, &mut out);
    out.sort();
    out
}

fn unknown_key(key: &str, base: &Table) -> anyhow::Error {
    anyhow::anyhow!(
        "unknown config key `{key}`; valid keys are:\n  {}",
        leaf_keys(base).join("\n  ")
    )
}

/// Parses an override's value as a TOML value (`2`, `1e-4`, `true`,
/// `[1, 2]`, `"text"`); anything that is not valid TOML is taken as a string.
fn parse_value(raw: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Sets `key` (dotted) to `raw` in `table`; the key must exist.
pub fn set_dotted(table: &mut Table, key: &str, raw: &str) -> Result<()> {
    let base = table.clone();
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = &mut *table;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let Some(entry) = cur.get_mut(*part) else {
            return Err(unknown_key(key, &base));
        };
        if last {
            if entry.is_table() {
                bail!(
                    "config key `{key}` is a section; set one of its keys, e.g. `{key}.{}`",
                    entry
                        .as_table()
                        .and_then(|t| t.keys().next())
                        .map(String::as_str)
                        .unwrap_or("...")
                );
            }
            *entry = parse_value(raw);
            return Ok(());
        }
        cur = match entry {
            Value::Table(t) => t,
            _ => return Err(unknown_key(key, &base)),
        };
    }
    Err(unknown_key(key, &base))
}

/// Merges `overlay` into `base`, refusing keys that `base` does not have.
pub fn merge_checked(base: &mut Table, overlay: &Table) -> Result<()> {
    fn go(base: &mut Table, overlay: &Table, prefix: &str, root: &Table) -> Result<()> {
        for (k, v) in overlay {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match (base.get_mut(k), v) {
                (Some(Value::Table(b)), Value::Table(o)) => go(b, o, &path, root)?,
                (Some(slot), v) if !slot.is_table() && !v.is_table() => *slot = v.clone(),
                (Some(_), _) => bail!("config key `{path}` mixes a section and a value"),
                (None, _) => return Err(unknown_key(&path, root)),
            }
        }
        Ok(())
    }
    let root = base.clone();
    go(base, overlay, "", &root)
}

/// A config value as a TOML table.
pub fn to_table<T: Serialize>(value: &T) -> Result<Table> {
    let text = toml::to_string(value).context("serialising the configuration")?;
    toml::from_str(&text).context("re-reading the serialised configuration")
}

/// A TOML table back into a typed config; type errors name the dotted key (the text
/// parsed here is our own serialisation, so its line numbers would mean nothing to a user).
pub fn from_table<T: DeserializeOwned>(table: Table) -> Result<T> {
    let text = toml::to_string(&table).context("serialising the configuration")?;
    toml::from_str(&text).map_err(|e| {
        let key = e.span().and_then(|span| key_at(&text, span.start));
        match key {
            Some(key) => anyhow::anyhow!("invalid configuration: `{key}`: {}", e.message()),
            None => anyhow::anyhow!("invalid configuration: {}", e.message()),
        }
    })
}

/// The dotted key of the `key = value` line holding byte `offset` of a serialised table.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    let section = before[..line_start]
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'));
    Some(match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_string(),
    })
}

/// Defaults -> optional config file -> `key=value` overrides.
pub fn layered<T: Serialize + DeserializeOwned>(
    defaults: &T,
    file: Option<&std::path::Path>,
    sets: &[String],
) -> Result<T> {
    let mut table = to_table(defaults)?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let overlay: Table = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        merge_checked(&mut table, &overlay)
            .with_context(|| format!("in config file {}", path.display()))?;
    }
    for set in sets {
        let (key, raw) = set.split_once('=').with_context(|| {
            format!("--set `{set}`: expected key=value, e.g. train.iterations=2")
        })?;
        set_dotted(&mut table, key.trim(), raw.trim()).with_context(|| format!("--set `{set}`"))?;
    }
    from_table(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        lr: f64,
        iterations: usize,
        name: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        seed: u64,
        train: Inner,
    }

    fn defaults() -> Cfg {
        Cfg {
            seed: 0,
            train: Inner {
                lr: 1e-4,
                iterations: 10,
                name: "a".into(),
            },
        }
    }

    #[test]
    fn overrides_apply_with_types() -> Result<()> {
        let sets = [
            "train.lr=2e-3".to_string(),
            "train.iterations=2".into(),
            "train.name=unet".into(),
            "seed=7".into(),
        ];
        let cfg: Cfg = layered(&defaults(), None, &sets)?;
        assert_eq!(
            cfg,
            Cfg {
                seed: 7,
                train: Inner {
                    lr: 2e-3,
                    iterations: 2,
                    name: "unet".into()
                }
            }
        );
        Ok(())
    }

    #[test]
    fn unknown_keys_list_the_valid_ones() {
        let err = layered(&defaults(), None, &["train.lrr=1".to_string()]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("unknown config key `train.lrr`"), "{msg}");
        assert!(
            msg.contains("train.iterations") && msg.contains("seed"),
            "{msg}"
        );
        assert!(layered(&defaults(), None, &["train=1".to_string()]).is_err());
        assert!(layered(&defaults(), None, &["nokey".to_string()]).is_err());
    }

    #[test]
    fn wrong_types_are_errors() {
        let err = layered(&defaults(), None, &["train.iterations=many".to_string()]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("`train.iterations`: invalid type: string \"many\"")
                && !msg.contains("line"),
            "{msg}"
        );
        let err = layered(&defaults(), None, &["seed=-1".to_string()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("`seed`: invalid value"),
            "{err:#}"
        );
    }

    #[test]
    fn config_file_merges_and_checks_keys() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[train]\niterations = 5\n")?;
        let cfg: Cfg = layered(&defaults(), Some(&path), &[])?;
        assert_eq!(cfg.train.iterations, 5);
        assert_eq!(cfg.train.lr, 1e-4);
        std::fs::write(&path, "[train]\nepochs = 5\n")?;
        let err = layered(&defaults(), Some(&path), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("c.toml"), "{err:#}");
        Ok(())
    }
}
