//! Settings files: `--config FILE` (TOML) for `run`, merged under the flags and the `TETHER_*`
//! variables, and `config example`, which prints every setting with its help and default.
//!
//! The flags are the one definition of every setting: a file key is a flag's long name
//! (`data-dir`, `peer`), its value is checked by that flag's own parser, and the merge turns
//! each key into the flag it names unless the command line or the environment already set it.
//! So the precedence is flags, then variables, then the file, then the defaults, and a setting
//! can never mean one thing in a file and another on the command line.

use clap::{Arg, ArgAction, Command};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the settings file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {detail}")]
    Syntax { path: PathBuf, detail: String },
    #[error("{path}: unknown key `{key}` (see `{bin} config example` for every setting)")]
    UnknownKey {
        path: PathBuf,
        key: String,
        bin: String,
    },
    #[error("{path}: key `{key}`: {detail}")]
    BadValue {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("--config needs a file name")]
    NoFileName,
}

/// The flag that names the file; never a key in it.
pub const CONFIG_FLAG: &str = "config";
/// Its variable.
pub const CONFIG_ENV: &str = "TETHER_CONFIG";

/// Settings a file may hold: the subcommand's flags and the global ones, minus help,
/// version and `config` itself.
fn settings<'a>(root: &'a Command, sub: &'a Command) -> Vec<&'a Arg> {
    let globals = root.get_arguments().filter(|a| a.is_global_set());
    sub.get_arguments()
        .chain(globals)
        .filter(|a| {
            let id = a.get_id().as_str();
            a.get_long().is_some() && !matches!(id, "help" | "version" | CONFIG_FLAG)
        })
        .collect()
}

fn takes_value(a: &Arg) -> bool {
    !matches!(
        a.get_action(),
        ArgAction::SetTrue
            | ArgAction::SetFalse
            | ArgAction::Count
            | ArgAction::Help
            | ArgAction::Version
    )
}

fn repeatable(a: &Arg) -> bool {
    matches!(a.get_action(), ArgAction::Append)
}

/// Finds `--config FILE` (or `--config=FILE`) after the subcommand `sub`, else `TETHER_CONFIG`.
fn config_path(args: &[OsString], sub_at: usize) -> Result<Option<PathBuf>, ConfigError> {
    let mut i = sub_at + 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return args
                .get(i + 1)
                .map(|p| Some(PathBuf::from(p)))
                .ok_or(ConfigError::NoFileName);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Ok(Some(PathBuf::from(p)));
        }
        i += 1;
    }
    Ok(std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from))
}

/// Whether the command line (after the subcommand) or the environment already sets `a`.
fn set_elsewhere(a: &Arg, args: &[OsString]) -> bool {
    let Some(long) = a.get_long() else {
        return false;
    };
    let flag = format!("--{long}");
    let on_line = args.iter().any(|x| {
        let x = x.to_string_lossy();
        x == flag || x.starts_with(&format!("{flag}="))
    });
    let in_env = a
        .get_env()
        .and_then(std::env::var_os)
        .is_some_and(|v| !v.is_empty());
    on_line || in_env
}

/// Returns `args` with the settings of the `--config` file of subcommand `sub` added as flags,
/// each checked by its flag's parser; `args` unchanged when there is no file.
pub fn merge(root: &Command, sub: &str, args: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(sub_at) = args.iter().position(|a| a == sub) else {
        return Ok(args);
    };
    let Some(subcmd) = root.find_subcommand(sub) else {
        return Ok(args);
    };
    let Some(path) = config_path(&args, sub_at)? else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let extra = flags_from(root, subcmd, &path, &text, &args)?;
    let mut out = args;
    // After the subcommand, before anything the user gave, so that positional arguments keep
    // their place.
    let at = sub_at + 1;
    out.splice(at..at, extra);
    Ok(out)
}

fn flags_from(
    root: &Command,
    sub: &Command,
    path: &Path,
    text: &str,
    args: &[OsString],
) -> Result<Vec<OsString>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            detail: e.message().to_string(),
        })?;
    let known = settings(root, sub);
    let bad = |key: &str, detail: String| ConfigError::BadValue {
        path: path.to_owned(),
        key: key.to_string(),
        detail,
    };
    let mut out = Vec::new();
    for (key, value) in &table {
        let Some(arg) = known.iter().find(|a| a.get_long() == Some(key.as_str())) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
                bin: root.get_name().to_string(),
            });
        };
        let values: Vec<String> = match value {
            toml::Value::Array(items) if repeatable(arg) => items
                .iter()
                .map(|v| {
                    scalar(v)
                        .ok_or_else(|| bad(key, "a list of strings or numbers expected".into()))
                })
                .collect::<Result<_, _>>()?,
            toml::Value::Array(_) => return Err(bad(key, "takes one value, not a list".into())),
            toml::Value::Boolean(b) if !takes_value(arg) => {
                if *b {
                    vec![String::new()]
                } else {
                    vec![]
                }
            }
            v => {
                vec![scalar(v)
                    .ok_or_else(|| bad(key, "a string, number or boolean expected".into()))?]
            }
        };
        if !takes_value(arg) && !matches!(value, toml::Value::Boolean(_)) {
            return Err(bad(key, "true or false expected".into()));
        }
        if set_elsewhere(arg, args) {
            continue;
        }
        for v in values {
            if takes_value(arg) {
                check_value(arg, key, &v).map_err(|e| bad(key, first_line(&e.to_string())))?;
                out.push(OsString::from(format!("--{key}={v}")));
            } else {
                out.push(OsString::from(format!("--{key}")));
            }
        }
    }
    Ok(out)
}

/// Runs `value` through the flag's own parser, alone (without the flag's relations to others,
/// which the full parse checks later).
fn check_value(arg: &Arg, key: &str, value: &str) -> Result<(), clap::Error> {
    let probe = Arg::new("value")
        .long(key.to_string())
        .value_parser(arg.get_value_parser().clone())
        .action(ArgAction::Set);
    Command::new("tether")
        .no_binary_name(true)
        .arg(probe)
        .try_get_matches_from([format!("--{key}={value}")])
        .map(|_| ())
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_string()
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A settings file with every setting of `sub`: its help, its variable, and its default (set,
/// so the file works as it is) or, without one, an example to fill in (commented out).
pub fn example(root: &Command, sub: &str) -> String {
    let bin = root.get_name();
    let mut out = format!(
        "# {bin} settings (TOML), for `{bin} {sub} --config FILE`.\n\
         # Every key is also a flag (--KEY) and an environment variable (TETHER_...).\n\
         # Precedence: flags, then environment variables, then this file, then the defaults.\n\
         # Unknown keys and bad values stop the start with an error naming the key.\n"
    );
    let Some(subcmd) = root.find_subcommand(sub) else {
        return out;
    };
    for a in settings(root, subcmd) {
        let Some(long) = a.get_long() else { continue };
        out.push('\n');
        let help = a
            .get_long_help()
            .or(a.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in wrap(&help, 96) {
            out.push_str(&format!("# {line}\n"));
        }
        let env = a
            .get_env()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let defaults: Vec<String> = a
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        let mut notes = Vec::new();
        if !env.is_empty() {
            notes.push(format!("variable {env}"));
        }
        if repeatable(a) {
            notes.push("a list".into());
        }
        if a.is_required_set() {
            notes.push("required".into());
        }
        if !notes.is_empty() {
            out.push_str(&format!("# ({})\n", notes.join("; ")));
        }
        if !takes_value(a) {
            out.push_str(&format!("{long} = false\n"));
        } else if repeatable(a) {
            let items: Vec<String> = defaults.iter().map(|d| toml_value(d)).collect();
            if items.is_empty() && a.is_required_set() {
                let name = a
                    .get_value_names()
                    .and_then(|v| v.first())
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "VALUE".into());
                out.push_str(&format!("# {long} = [\"{name}\"]\n"));
            } else if items.is_empty() {
                out.push_str(&format!("{long} = []\n"));
            } else {
                out.push_str(&format!("{long} = [{}]\n", items.join(", ")));
            }
        } else if let Some(d) = defaults.first() {
            out.push_str(&format!("{long} = {}\n", toml_value(d)));
        } else {
            let name = a
                .get_value_names()
                .and_then(|v| v.first())
                .map(|v| v.to_string())
                .unwrap_or_else(|| "VALUE".into());
            out.push_str(&format!("# {long} = \"{name}\"\n"));
        }
    }
    out
}

fn toml_value(s: &str) -> String {
    if s.parse::<i64>().is_ok() || s == "true" || s == "false" {
        s.to_string()
    } else {
        toml::Value::String(s.to_string()).to_string()
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.lines() {
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.len() + word.len() + 1 > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Parser, Subcommand};

    #[derive(Parser, Debug)]
    #[command(name = "t")]
    struct Cli {
        #[arg(
            long,
            env = "TETHER_TEST_LOG_LEVEL",
            default_value = "info",
            global = true
        )]
        log_level: String,
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Run(RunArgs),
    }

    #[derive(Args, Debug)]
    struct RunArgs {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where state lives.
        #[arg(long, env = "TETHER_TEST_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, env = "TETHER_TEST_PORT", default_value_t = 9443)]
        port: u16,
        #[arg(long = "peer", env = "TETHER_TEST_PEER", value_delimiter = ',')]
        peers: Vec<String>,
        #[arg(long, env = "TETHER_TEST_QUIET")]
        quiet: bool,
    }

    fn parse(file: &str, line: &[&str]) -> Result<Cli, String> {
        use clap::CommandFactory;
        let dir = std::env::temp_dir().join(format!(
            "tether-cfg-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join("c.toml");
        std::fs::write(&path, file).map_err(|e| e.to_string())?;
        let mut args: Vec<OsString> = vec![
            "t".into(),
            "run".into(),
            "--config".into(),
            path.clone().into(),
        ];
        args.extend(line.iter().map(OsString::from));
        let merged = merge(&Cli::command(), "run", args).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        Cli::try_parse_from(merged?).map_err(|e| e.to_string())
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let cli = parse(
            "data-dir = \"/var/lib/x\"\nport = 10000\npeer = [\"a:1\", \"b:2\"]\nquiet = true\nlog-level = \"debug\"\n",
            &["--port", "11000"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.log_level, "debug");
        let Cmd::Run(r) = cli.cmd;
        assert_eq!(r.data_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(r.port, 11000, "the flag wins over the file");
        assert_eq!(r.peers, vec!["a:1", "b:2"]);
        assert!(r.quiet);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_file() {
        let e = parse("data-dir = \"/x\"\nprot = 1\n", &[])
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("unknown key `prot`") && e.contains("c.toml"),
            "{e}"
        );
        let e = parse("data-dir = \"/x\"\nport = \"many\"\n", &[])
            .err()
            .unwrap_or_default();
        assert!(e.contains("key `port`") && e.contains("c.toml"), "{e}");
        let e = parse("data-dir = \"/x\"\nport = [1, 2]\n", &[])
            .err()
            .unwrap_or_default();
        assert!(e.contains("not a list"), "{e}");
        let e = parse("data-dir = \n", &[]).err().unwrap_or_default();
        assert!(e.contains("not valid TOML"), "{e}");
        let e = parse("data-dir = \"/x\"\nquiet = \"yes\"\n", &[])
            .err()
            .unwrap_or_default();
        assert!(e.contains("true or false"), "{e}");
    }

    #[test]
    fn the_example_parses_and_lists_every_setting() {
        use clap::CommandFactory;
        let text = example(&Cli::command(), "run");
        let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(table.get("port").and_then(|v| v.as_integer()), Some(9443));
        assert!(text.contains("# data-dir = "), "{text}");
        assert!(text.contains("# Where state lives"), "{text}");
        assert!(text.contains("peer = []"));
        assert!(text.contains("log-level = \"info\""));
        assert!(!text.contains("config ="));
    }
}
