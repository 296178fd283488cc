//! Settings from the `--config` YAML file and from `EBPF_AGENT_*` environment variables, layered
//! under the command line: flags > environment > file > defaults.
//!
//! Nothing here names an option: keys, variables and value checks all come from the clap
//! definition in cli.rs (`Cli::command()`), so an option added there is settable everywhere at
//! once. The file and the environment are turned into extra `--option=value` arguments for the
//! options the command line left unset, and clap parses the lot: one parser, one set of checks.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
};

use clap::{
    Arg, ArgAction, ArgMatches, Command, CommandFactory as _, FromArgMatches as _,
    builder::ValueParser,
    error::{ContextKind, ContextValue},
    parser::ValueSource,
};
use saphyr::{LoadableYamlNode as _, MarkedYaml, Scalar, YamlData};
use thiserror::Error;

use crate::cli::Cli;

/// Prefix of every option's own environment variable: `EBPF_AGENT_CAPTURE_SIZE`.
pub const ENV_PREFIX: &str = "EBPF_AGENT_";

/// The option that names the file: as a key of the file itself it would be circular.
const CONFIG_OPTION: &str = "config";

/// Larger files are refused: a configuration is a few lines, and a wrong path (a log, a
/// device) must not be read whole.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The full URL of the traces export, used as is (see `EndpointForm::TracesUrl`).
const TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// Per-signal OTLP variables, read after `EBPF_AGENT_<OPTION>` and before the option's own
/// clap `env` (the generic OTEL_EXPORTER_OTLP_*): the exporter specification lets the
/// per-signal variable win over the generic one.
const SIGNAL_ENV: &[(&str, &str)] = &[
    ("otlp_endpoint", TRACES_ENDPOINT_ENV),
    ("otlp_protocol", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ("otlp_certificate", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"),
    (
        "otlp_client_certificate",
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    ),
    ("otlp_client_key", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY"),
    ("otlp_header", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
    ("otlp_compression", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
    ("otlp_timeout", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
    ("otlp_insecure", "OTEL_EXPORTER_OTLP_TRACES_INSECURE"),
];

const AFTER_HELP: &str = "Every option can also be set by an environment variable \
(EBPF_AGENT_ and the option's name in upper snake case, lists comma-separated) or by a key of the \
YAML file given with --config (the option's name in snake case, lists as YAML lists). \
Precedence: flags, then environment, then file, then defaults.";

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The command line itself was wrong, or asked for --help/--version: clap reports it.
    #[error(transparent)]
    CommandLine(#[from] clap::Error),
    // The I/O error is in the message, not a `source`: printed with its causes it would repeat.
    #[error("cannot read the configuration file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}:{line}:{col}: not valid YAML: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{}: {problem}", path.display())]
    Layout { path: PathBuf, problem: String },
    /// The key itself is not shown: a file that is not a configuration (a wrong path) must
    /// not have its text printed.
    #[error("{at}: unknown key{hint}")]
    UnknownKey { at: Origin, hint: String },
    #[error("{at}: {}: {problem}", subject(.at, .key))]
    BadValue {
        at: Origin,
        key: String,
        problem: String,
    },
    #[error("environment variable {var} is not valid UTF-8")]
    EnvNotUtf8 { var: String },
}

/// Where a setting was read: a place in the file, or an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    File {
        path: PathBuf,
        line: usize,
        col: usize,
    },
    Env {
        var: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, col } => write!(f, "{}:{line}:{col}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
        }
    }
}

fn subject(at: &Origin, key: &str) -> String {
    match at {
        Origin::File { .. } => format!("key `{key}`"),
        Origin::Env { .. } => format!("option --{}", key.replace('_', "-")),
    }
}

/// Which layer gave an option its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(String),
    File { line: usize },
    Default,
}

/// How an option takes values, from its clap action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// A flag without a value (`--db-raw-query`): true or false.
    Switch,
    One,
    /// Repeatable (`--comm a --comm b`): a list.
    Many,
}

/// One command-line option, with the names it has in the environment and in the file.
#[derive(Clone, Debug)]
struct Opt {
    id: String,
    long: String,
    key: String,
    shape: Shape,
    /// In precedence order: `EBPF_AGENT_<OPTION>`, per-signal OTLP, clap's own `env`.
    env: Vec<String>,
    parser: ValueParser,
    possible: Vec<String>,
    /// Values look like `KEY=VALUE`: a YAML mapping is accepted for the list.
    pairs: bool,
}

fn shape(arg: &Arg) -> Option<Shape> {
    match arg.get_action() {
        ArgAction::SetTrue => Some(Shape::Switch),
        ArgAction::Set => Some(Shape::One),
        ArgAction::Append => Some(Shape::Many),
        // Help, version, counters, SetFalse: nothing a config file should set.
        _ => None,
    }
}

/// The options the file and the environment can set: every long option clap knows.
fn options(cmd: &Command) -> Vec<Opt> {
    cmd.get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let shape = shape(arg)?;
            let key = long.replace('-', "_");
            let mut env = vec![format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())];
            env.extend(
                SIGNAL_ENV
                    .iter()
                    .filter(|(k, _)| *k == key)
                    .map(|(_, var)| (*var).to_owned()),
            );
            if let Some(own) = arg.get_env().and_then(|e| e.to_str())
                && !env.iter().any(|e| e == own)
            {
                env.push(own.to_owned());
            }
            Some(Opt {
                id: arg.get_id().to_string(),
                long: long.to_owned(),
                key,
                shape,
                env,
                parser: arg.get_value_parser().clone(),
                possible: arg
                    .get_possible_values()
                    .iter()
                    .map(|p| p.get_name().to_owned())
                    .collect(),
                pairs: arg
                    .get_value_names()
                    .is_some_and(|names| names.iter().any(|n| n.contains('='))),
            })
        })
        .collect()
}

/// The command clap parses with: its own `env` reading removed (this module reads the
/// environment, in a fixed order and testably), and help naming each option's variable and key.
fn command(opts: &[Opt]) -> Command {
    Cli::command().after_help(AFTER_HELP).mut_args(|arg| {
        let arg = arg.env(None::<&'static str>);
        let Some(opt) = opts.iter().find(|o| o.id == arg.get_id().as_str()) else {
            return arg;
        };
        let key = if opt.key == CONFIG_OPTION {
            String::new()
        } else {
            format!(" [config: {}]", opt.key)
        };
        let note = format!("[env: {}]{key}", opt.env.join(", "));
        let help = match arg.get_help() {
            Some(help) => format!("{help} {note}"),
            None => note.clone(),
        };
        let long_help = arg.get_long_help().map(|h| format!("{h}\n{note}"));
        let arg = arg.help(help);
        match long_help {
            Some(h) => arg.long_help(h),
            None => arg,
        }
    })
}

/// Checks one value with the option's own clap parser, so the file and the environment accept
/// exactly what the command line accepts. The reason does not repeat the value (the parsers
/// name the range or the form expected instead).
fn check_value(opt: &Opt, value: &str) -> Result<(), String> {
    // A one-argument command: the real one would also check unrelated required options.
    let probe = Command::new("agent").no_binary_name(true).arg(
        Arg::new("value")
            .long("value")
            .action(ArgAction::Set)
            .value_parser(opt.parser.clone()),
    );
    match probe.try_get_matches_from([format!("--value={value}")]) {
        Ok(_) => Ok(()),
        Err(err) => Err(reason(&err)),
    }
}

/// The part of a clap value error that says what is wrong, without clap's usage text.
fn reason(err: &clap::Error) -> String {
    if let Some(ContextValue::Strings(valid)) = err.get(ContextKind::ValidValue) {
        return format!("expected one of {}", valid.join(", "));
    }
    if let Some(source) = std::error::Error::source(err) {
        return source.to_string();
    }
    let text = err.to_string();
    text.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// The settings one layer (environment or file) gives an option.
#[derive(Clone, Debug)]
struct Setting {
    values: Vec<String>,
    source: Source,
}

/// The environment layer for one option: its first variable that is set and not empty (the
/// OpenTelemetry specification treats an empty variable as unset).
fn env_setting(
    opt: &Opt,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Option<Setting>, ConfigError> {
    for var in &opt.env {
        let Some(raw) = env(var) else { continue };
        let text = raw
            .into_string()
            .map_err(|_| ConfigError::EnvNotUtf8 { var: var.clone() })?;
        if text.trim().is_empty() {
            continue;
        }
        let at = Origin::Env { var: var.clone() };
        let bad = |problem: String| ConfigError::BadValue {
            at: at.clone(),
            key: opt.key.clone(),
            problem,
        };
        let values = match opt.shape {
            Shape::Switch => vec![
                parse_bool(&text)
                    .ok_or_else(|| bad(format!("expected true or false, found {text:?}")))?
                    .to_string(),
            ],
            Shape::One => vec![text],
            Shape::Many => text
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        if opt.shape != Shape::Switch {
            for value in &values {
                check_value(opt, value)
                    .map_err(|why| bad(format!("invalid value {value:?}: {why}")))?;
            }
        }
        return Ok(Some(Setting {
            values,
            source: Source::Env(var.clone()),
        }));
    }
    Ok(None)
}

fn node_origin(path: &Path, node: &MarkedYaml<'_>) -> Origin {
    Origin::File {
        path: path.to_owned(),
        line: node.span.start.line(),
        // saphyr counts columns from 0, editors from 1.
        col: node.span.start.col() + 1,
    }
}

fn kind(node: &MarkedYaml<'_>) -> &'static str {
    match &node.data {
        YamlData::Sequence(_) => "a list",
        YamlData::Mapping(_) => "a mapping",
        YamlData::Value(Scalar::Null) => "nothing",
        _ => "a value",
    }
}

/// Tags (`!!str 8080`) only change how a scalar was read; the value is what counts.
fn untagged<'a, 'b>(node: &'a MarkedYaml<'b>) -> &'a MarkedYaml<'b> {
    match &node.data {
        YamlData::Tagged(_, inner) => untagged(inner),
        _ => node,
    }
}

/// A scalar as the text clap would get on the command line; None for null.
fn scalar_text(node: &MarkedYaml<'_>) -> Option<String> {
    match &untagged(node).data {
        YamlData::Value(Scalar::Boolean(b)) => Some(b.to_string()),
        YamlData::Value(Scalar::Integer(i)) => Some(i.to_string()),
        YamlData::Value(Scalar::FloatingPoint(f)) => Some(f.to_string()),
        YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
        YamlData::Representation(s, _, _) => Some(s.to_string()),
        _ => None,
    }
}

/// One file value, as the strings the option's `--option=` arguments would carry.
fn file_values(opt: &Opt, node: &MarkedYaml<'_>, path: &Path) -> Result<Vec<String>, ConfigError> {
    let bad = |node: &MarkedYaml<'_>, problem: String| ConfigError::BadValue {
        at: node_origin(path, node),
        key: opt.key.clone(),
        problem,
    };
    let node = untagged(node);
    let scalar = |item: &MarkedYaml<'_>| -> Result<String, ConfigError> {
        let item = untagged(item);
        match &item.data {
            // YAML reads on/off as strings, true/false as booleans: accept both for on|off options.
            YamlData::Value(Scalar::Boolean(b))
                if opt.possible.iter().any(|p| p == "on")
                    && opt.possible.iter().any(|p| p == "off") =>
            {
                Ok(if *b { "on" } else { "off" }.to_owned())
            }
            YamlData::Value(Scalar::Null) | YamlData::Sequence(_) | YamlData::Mapping(_) => {
                Err(bad(
                    item,
                    format!("expected a single value, found {}", kind(item)),
                ))
            }
            _ => scalar_text(item)
                .ok_or_else(|| bad(item, "not a value this option can take".to_owned())),
        }
    };
    // Each value is checked where it stands; the message does not repeat it.
    let checked = |item: &MarkedYaml<'_>, text: String| -> Result<String, ConfigError> {
        check_value(opt, &text).map_err(|why| bad(item, format!("invalid value: {why}")))?;
        Ok(text)
    };
    let single = |item: &MarkedYaml<'_>| checked(item, scalar(item)?);
    let values = match (opt.shape, &node.data) {
        (Shape::Switch, _) => {
            let text = scalar_text(node).unwrap_or_default();
            let on = parse_bool(&text).ok_or_else(|| {
                let found = match &node.data {
                    YamlData::Sequence(_) | YamlData::Mapping(_) => {
                        format!(", found {}", kind(node))
                    }
                    _ => String::new(),
                };
                bad(node, format!("expected true or false{found}"))
            })?;
            return Ok(vec![on.to_string()]);
        }
        (Shape::One, YamlData::Sequence(_)) => {
            return Err(bad(node, "takes one value, not a list".to_owned()));
        }
        (Shape::One, _) => vec![single(node)?],
        (Shape::Many, YamlData::Sequence(items)) => {
            items.iter().map(single).collect::<Result<_, _>>()?
        }
        (Shape::Many, YamlData::Mapping(map)) if opt.pairs => map
            .iter()
            .map(|(k, v)| checked(k, format!("{}={}", scalar(k)?, scalar(v)?)))
            .collect::<Result<_, ConfigError>>()?,
        (Shape::Many, _) => vec![single(node)?],
    };
    Ok(values)
}

/// Reads the file layer: a YAML mapping of option keys to values. A null value leaves the
/// option unset.
fn file_settings(
    path: &Path,
    text: &str,
    opts: &[Opt],
) -> Result<BTreeMap<String, Setting>, ConfigError> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        line: e.marker().line(),
        col: e.marker().col() + 1,
        message: unquoted(e.info()),
    })?;
    let layout = |problem: String| ConfigError::Layout {
        path: path.to_owned(),
        problem,
    };
    let root = match docs.as_slice() {
        [] => return Ok(BTreeMap::new()),
        [root] => untagged(root),
        more => {
            return Err(layout(format!(
                "holds {} YAML documents; put every setting in one",
                more.len()
            )));
        }
    };
    let map = match &root.data {
        YamlData::Mapping(map) => map,
        YamlData::Value(Scalar::Null) => return Ok(BTreeMap::new()),
        _ => {
            return Err(layout(format!(
                "must be a mapping of option names to values (such as `capture_size: 8192`), not {}",
                kind(root)
            )));
        }
    };
    let mut settings = BTreeMap::new();
    for (key_node, value) in map {
        let key = scalar_text(key_node).unwrap_or_else(|| kind(key_node).to_owned());
        let at = node_origin(path, key_node);
        let Some(opt) = opts.iter().find(|o| o.key == key && o.key != CONFIG_OPTION) else {
            return Err(ConfigError::UnknownKey {
                hint: hint(&key, opts),
                at,
            });
        };
        if scalar_text(value).is_none() && matches!(untagged(value).data, YamlData::Value(_)) {
            continue;
        }
        let values = file_values(opt, value, path)?;
        settings.insert(
            opt.id.clone(),
            Setting {
                values,
                source: Source::File {
                    line: key_node.span.start.line(),
                },
            },
        );
    }
    Ok(settings)
}

/// A parser message without what it quotes from the text (saphyr quotes an unexpected
/// character).
fn unquoted(message: &str) -> String {
    let end = message.find(['`', '\'', '"']).unwrap_or(message.len());
    message[..end].trim_end_matches([':', ' ']).to_owned()
}

/// What to tell the author of an unknown key: the key they probably meant.
fn hint(key: &str, opts: &[Opt]) -> String {
    if key == CONFIG_OPTION {
        return " `config`: the file cannot name another configuration file".to_owned();
    }
    let normalized = key.trim().to_ascii_lowercase().replace('-', "_");
    let best = opts
        .iter()
        .filter(|o| o.key != CONFIG_OPTION)
        .map(|o| (strsim::levenshtein(&normalized, &o.key), o))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, o)) if d <= 2 => {
            format!("; did you mean `{}`?", o.key)
        }
        _ => format!(
            "; the keys are the option names with `_` for `-` ({})",
            opts.iter()
                .filter(|o| o.key != CONFIG_OPTION)
                .map(|o| o.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The outcome of layering: clap's matches over every layer, and where each option came from.
struct Resolution {
    matches: ArgMatches,
    /// By config key.
    sources: BTreeMap<String, Source>,
}

fn resolve_matches(
    args: &[OsString],
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Resolution, ConfigError> {
    let opts = options(&Cli::command());
    let cmd = command(&opts);
    let given = cmd.clone().try_get_matches_from(args)?;

    // Flags first, then the environment; what they leave unset may come from the file.
    let mut chosen: BTreeMap<String, Setting> = BTreeMap::new();
    for opt in &opts {
        if given.value_source(&opt.id) == Some(ValueSource::CommandLine) {
            chosen.insert(
                opt.id.clone(),
                Setting {
                    values: Vec::new(),
                    source: Source::Flag,
                },
            );
        } else if let Some(setting) = env_setting(opt, env)? {
            chosen.insert(opt.id.clone(), setting);
        }
    }
    let file = match chosen.get(CONFIG_OPTION) {
        Some(Setting {
            source: Source::Flag,
            ..
        }) => given
            .get_raw(CONFIG_OPTION)
            .and_then(|mut v| v.next())
            .map(PathBuf::from),
        Some(setting) => setting.values.first().map(PathBuf::from),
        None => None,
    };
    if let Some(path) = &file {
        let text = read(path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
        })?;
        for (id, setting) in file_settings(path, &text, &opts)? {
            chosen.entry(id).or_insert(setting);
        }
    }

    // Layers below the command line become arguments placed before the user's own.
    let mut argv: Vec<OsString> = args.iter().take(1).cloned().collect();
    let mut sources = BTreeMap::new();
    for opt in &opts {
        let Some(setting) = chosen.get(&opt.id) else {
            sources.insert(opt.key.clone(), Source::Default);
            continue;
        };
        sources.insert(opt.key.clone(), setting.source.clone());
        if setting.source == Source::Flag {
            continue;
        }
        for value in &setting.values {
            match opt.shape {
                Shape::Switch if value == "true" => argv.push(format!("--{}", opt.long).into()),
                Shape::Switch => {}
                Shape::One | Shape::Many => argv.push(format!("--{}={value}", opt.long).into()),
            }
        }
    }
    argv.extend(args.iter().skip(1).cloned());
    let matches = cmd.try_get_matches_from(argv)?;
    Ok(Resolution { matches, sources })
}

/// The agent's settings from `args`, the environment `env` and the file `--config` names.
fn resolve(
    args: &[OsString],
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<(Cli, Resolution), ConfigError> {
    let resolution = resolve_matches(args, env, read)?;
    let mut cli = Cli::from_arg_matches(&resolution.matches)?;
    cli.otlp_endpoint_is_traces_url = matches!(
        resolution.sources.get("otlp_endpoint"),
        Some(Source::Env(var)) if var == TRACES_ENDPOINT_ENV
    );
    Ok((cli, resolution))
}

/// The text of a configuration file, at most [`MAX_FILE_BYTES`]. Errors never quote it.
fn read_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "it is larger than {} MiB, the most a configuration file may be: is it the right file?",
            MAX_FILE_BYTES >> 20
        )));
    }
    String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is not UTF-8 text: is it the right file?",
        )
    })
}

/// The agent's settings from this process's command line, environment and `--config` file.
/// Command-line mistakes, --help and --version print and exit like clap does.
pub fn load() -> Result<Cli, ConfigError> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let (cli, resolution) = match resolve(&args, &|var| std::env::var_os(var), &read_file) {
        Ok(resolved) => resolved,
        Err(ConfigError::CommandLine(err)) => err.exit(),
        Err(err) => return Err(err),
    };
    // Say where settings came from: a surprising value is then one look away from its cause.
    let mut from_env = Vec::new();
    let mut from_file = Vec::new();
    for (key, source) in &resolution.sources {
        match source {
            Source::Env(var) => from_env.push(var.as_str()),
            Source::File { line } => from_file.push(format!("{key} (line {line})")),
            Source::Flag | Source::Default => {}
        }
    }
    if !from_env.is_empty() {
        eprintln!(
            "agent: settings from the environment: {}",
            from_env.join(", ")
        );
    }
    if let Some(path) = &cli.config {
        eprintln!(
            "agent: configuration file {}: {}",
            path.display(),
            if from_file.is_empty() {
                "nothing applied (flags and environment set all it sets)".to_owned()
            } else {
                format!("applied {}", from_file.join(", "))
            }
        );
    }
    Ok(cli)
}

#[cfg(test)]
mod tests;
