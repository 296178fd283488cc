use std::io;

use super::*;
use crate::cli::{ProtocolArg, Switch};

const FILE: &str = "/etc/ebpf-agent/test.yaml";

/// Resolves `args` with the environment `env` and, when `file` is given, `--config FILE`
/// holding that text (added to the command line unless `args` names a file itself).
fn run(
    args: &[&str],
    env: &[(&str, &str)],
    file: Option<&str>,
) -> Result<(Cli, Resolution), ConfigError> {
    let mut argv: Vec<OsString> = vec!["agent".into()];
    argv.extend(args.iter().map(OsString::from));
    let names_file =
        args.contains(&"--config") || env.iter().any(|(k, _)| *k == "EBPF_AGENT_CONFIG");
    if file.is_some() && !names_file {
        argv.extend(["--config".into(), FILE.into()]);
    }
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let text = file.map(str::to_owned);
    resolve(
        &argv,
        &|var| {
            env.iter()
                .find(|(k, _)| k == var)
                .map(|(_, v)| OsString::from(v))
        },
        &|path| match &text {
            Some(text) if path == Path::new(FILE) => Ok(text.clone()),
            _ => Err(io::Error::new(io::ErrorKind::NotFound, "No such file")),
        },
    )
}

fn error(args: &[&str], env: &[(&str, &str)], file: Option<&str>) -> String {
    match run(args, env, file) {
        Ok((cli, _)) => panic!("accepted: {cli:?}"),
        Err(err) => err.to_string(),
    }
}

fn raw(m: &ArgMatches, id: &str) -> Vec<String> {
    m.get_raw(id)
        .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn all_options() -> Vec<Opt> {
    options(&Cli::command())
}

/// clap's default values of an option.
fn defaults(opt: &Opt) -> Vec<String> {
    // Built: clap gives flags (SetTrue) their `false` default only then.
    let mut cmd = Cli::command();
    cmd.build();
    cmd.get_arguments()
        .find(|a| a.get_id().as_str() == opt.id)
        .map(|a| {
            a.get_default_values()
                .iter()
                .map(|d| d.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Values tried as samples for options without possible values; the option's parser picks.
const CANDIDATES: &[&str] = &[
    "7",
    "9",
    "a=1",
    "b=2",
    "http://a:1",
    "http://b:2",
    "x",
    "y",
    "127.0.0.1:9464",
    "0.0.0.0:9465",
    "0.5",
    "0.25",
];

/// Two different values the option accepts, the first not its default.
fn samples(opt: &Opt) -> (String, String) {
    if opt.shape == Shape::Switch {
        return ("true".into(), "false".into());
    }
    let valid: Vec<&str> = opt
        .possible
        .iter()
        .map(String::as_str)
        .chain(CANDIDATES.iter().copied())
        .filter(|v| check_value(opt, v).is_ok())
        .collect();
    let first = valid
        .iter()
        .find(|v| !defaults(opt).iter().any(|d| d == *v))
        .unwrap_or_else(|| panic!("no sample value for --{}: extend CANDIDATES", opt.long));
    let second = valid
        .iter()
        .find(|v| *v != first)
        .unwrap_or_else(|| panic!("no second sample value for --{}", opt.long));
    ((*first).to_owned(), (*second).to_owned())
}

/// A YAML scalar: plain when it is a plain word or number (so typed YAML values are exercised),
/// double-quoted otherwise.
fn quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
    {
        value.to_owned()
    } else {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn yaml_value(opt: &Opt, values: &[String]) -> String {
    match opt.shape {
        Shape::Switch | Shape::One => values.first().map(|v| quote(v)).unwrap_or_default(),
        Shape::Many => format!(
            "[{}]",
            values
                .iter()
                .map(|v| quote(v))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The settings in `matches` as a config file: what `--config` would need to reproduce them.
fn dump(matches: &ArgMatches) -> String {
    let mut out = String::new();
    for opt in all_options().iter().filter(|o| o.key != CONFIG_OPTION) {
        let values = raw(matches, &opt.id);
        if values.is_empty() && opt.shape == Shape::One {
            continue;
        }
        out.push_str(&format!("{}: {}\n", opt.key, yaml_value(opt, &values)));
    }
    out
}

#[test]
fn every_clap_argument_is_settable_from_file_and_environment() {
    let opts = all_options();
    for arg in Cli::command().get_arguments() {
        assert!(
            opts.iter().any(|o| o.id == arg.get_id().as_str()),
            "option {} cannot be set from the file or the environment: give it a long name and a \
             Set, SetTrue or Append action (see config.rs)",
            arg.get_id()
        );
    }
    for (key, _) in SIGNAL_ENV {
        assert!(
            opts.iter().any(|o| o.key == *key),
            "SIGNAL_ENV names unknown key {key}"
        );
    }
}

#[test]
fn flags_beat_environment_beat_file_beat_defaults_for_every_option() {
    for opt in all_options().iter().filter(|o| o.key != CONFIG_OPTION) {
        let (a, b) = samples(opt);
        let ctx = format!("--{} (samples {a:?}, {b:?})", opt.long);
        let file_a = format!(
            "{}: {}\n",
            opt.key,
            yaml_value(opt, std::slice::from_ref(&a))
        );
        let file_b = format!(
            "{}: {}\n",
            opt.key,
            yaml_value(opt, std::slice::from_ref(&b))
        );
        let flag = match opt.shape {
            Shape::Switch => format!("--{}", opt.long),
            Shape::One | Shape::Many => format!("--{}={a}", opt.long),
        };

        let (_, r) = run(&[], &[], None).expect(&ctx);
        assert_eq!(raw(&r.matches, &opt.id), defaults(opt), "{ctx}: default");
        assert_eq!(r.sources[&opt.key], Source::Default, "{ctx}");

        // The file sets what nothing else sets.
        let (_, r) = run(&[], &[], Some(&file_a)).expect(&ctx);
        assert_eq!(raw(&r.matches, &opt.id), vec![a.clone()], "{ctx}: file");
        assert_eq!(r.sources[&opt.key], Source::File { line: 1 }, "{ctx}");

        // Each of the option's variables beats the file.
        for var in &opt.env {
            let (_, r) = run(&[], &[(var, &b)], Some(&file_a)).expect(&ctx);
            assert_eq!(raw(&r.matches, &opt.id), vec![b.clone()], "{ctx}: {var}");
            assert_eq!(r.sources[&opt.key], Source::Env(var.clone()), "{ctx}");
        }
        // Among the variables, the earlier one wins (EBPF_AGENT_* first).
        for pair in opt.env.windows(2) {
            let (_, r) = run(&[], &[(&pair[0], &a), (&pair[1], &b)], None).expect(&ctx);
            assert_eq!(raw(&r.matches, &opt.id), vec![a.clone()], "{ctx}: {pair:?}");
        }

        // The flag beats every variable and the file.
        let env: Vec<(&str, &str)> = opt.env.iter().map(|v| (v.as_str(), b.as_str())).collect();
        let (_, r) = run(&[&flag], &env, Some(&file_b)).expect(&ctx);
        assert_eq!(raw(&r.matches, &opt.id), vec![a.clone()], "{ctx}: flag");
        assert_eq!(r.sources[&opt.key], Source::Flag, "{ctx}");
    }
}

#[test]
fn file_values_reach_the_typed_settings() {
    let file = "\
# a comment
capture_size: 8192
comm: [nginx, 'python*']
exe:
  - /usr/bin/node
port: 8080            # one value for a list option
otlp_endpoint: http://collector:4317
otlp_protocol: http/protobuf
db_raw_query: true
context_propagation: off
in_process_linking: false   # a YAML boolean for an on|off option
same_host_pairing: !!str on
max_spans_per_trace: 10
max_trace_age: ~            # null: the default stays
";
    let (cli, r) = run(&[], &[], Some(file)).expect("valid file");
    assert_eq!(cli.capture_size, 8192);
    assert_eq!(cli.comms, ["nginx", "python*"]);
    assert_eq!(cli.exes, ["/usr/bin/node"]);
    assert_eq!(cli.ports, [8080]);
    assert_eq!(cli.otlp_endpoint.as_deref(), Some("http://collector:4317"));
    assert_eq!(cli.otlp_protocol, ProtocolArg::HttpProtobuf);
    assert!(cli.db_raw_query);
    assert_eq!(cli.context_propagation, Switch::Off);
    assert_eq!(cli.in_process_linking, Switch::Off);
    assert_eq!(cli.same_host_pairing, Switch::On);
    assert_eq!(cli.max_spans_per_trace, 10);
    assert_eq!(cli.max_trace_age, 300);
    assert_eq!(r.sources["max_trace_age"], Source::Default);
    assert_eq!(r.sources["capture_size"], Source::File { line: 2 });
    assert_eq!(cli.config.as_deref(), Some(Path::new(FILE)));
}

#[test]
fn environment_lists_are_comma_separated_and_switches_take_words() {
    let (cli, _) = run(
        &[],
        &[
            ("EBPF_AGENT_COMM", "nginx, python* ,,node"),
            ("EBPF_AGENT_PORT", "80,443"),
            ("EBPF_AGENT_DB_RAW_QUERY", "yes"),
            ("EBPF_AGENT_CONTEXT_PROPAGATION", "off"),
        ],
        None,
    )
    .expect("valid environment");
    assert_eq!(cli.comms, ["nginx", "python*", "node"]);
    assert_eq!(cli.ports, [80, 443]);
    assert!(cli.db_raw_query);
    assert_eq!(cli.context_propagation, Switch::Off);

    // A false switch in the environment overrides a true one in the file.
    let (cli, _) = run(
        &[],
        &[("EBPF_AGENT_DB_RAW_QUERY", "false")],
        Some("db_raw_query: true\n"),
    )
    .expect("valid");
    assert!(!cli.db_raw_query);
}

#[test]
fn the_file_can_be_named_by_the_environment_and_flags_still_win() {
    let (cli, r) = run(
        &["--capture-size", "512"],
        &[("EBPF_AGENT_CONFIG", FILE)],
        Some("capture_size: 1024\nstats_interval: 5\n"),
    )
    .expect("valid");
    assert_eq!(cli.config.as_deref(), Some(Path::new(FILE)));
    assert_eq!(cli.capture_size, 512);
    assert_eq!(cli.stats_interval, 5);
    assert_eq!(r.sources["config"], Source::Env("EBPF_AGENT_CONFIG".into()));
}

#[test]
fn empty_variables_count_as_unset() {
    let (cli, r) = run(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            ("EBPF_AGENT_COMM", " "),
        ],
        Some("otlp_endpoint: http://from-file:4317\ncomm: [a]\n"),
    )
    .expect("valid");
    assert_eq!(cli.otlp_endpoint.as_deref(), Some("http://from-file:4317"));
    assert_eq!(cli.comms, ["a"]);
    assert_eq!(r.sources["otlp_endpoint"], Source::File { line: 1 });
}

#[test]
fn only_the_traces_variable_names_the_full_traces_url() {
    use crate::export::{EndpointForm, ExportTarget};
    let form = |args: &[&str], env: &[(&str, &str)]| {
        let (cli, _) = run(args, env, None).expect("valid");
        match cli.export_config().expect("valid").target {
            ExportTarget::Otlp { form, endpoint, .. } => (form, endpoint),
            ExportTarget::Console => panic!("no endpoint"),
        }
    };
    let traces = (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "http://gw/ingest/traces",
    );
    let generic = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
    assert_eq!(
        form(&[], &[traces, generic]),
        (
            EndpointForm::TracesUrl,
            "http://gw/ingest/traces".to_owned()
        )
    );
    assert_eq!(
        form(&[], &[generic]),
        (EndpointForm::Base, "http://c:4318".to_owned())
    );
    // A flag or the agent's own variable wins over both and is a base URL.
    assert_eq!(
        form(&["--otlp-endpoint", "http://flag:4318"], &[traces]),
        (EndpointForm::Base, "http://flag:4318".to_owned())
    );
    assert_eq!(
        form(
            &[],
            &[("EBPF_AGENT_OTLP_ENDPOINT", "http://own:4318"), traces]
        ),
        (EndpointForm::Base, "http://own:4318".to_owned())
    );
}

/// The OTLP options of an agent run with `args`, `env` and `file`.
fn otlp(
    args: &[&str],
    env: &[(&str, &str)],
    file: Option<&str>,
) -> (crate::export::OtlpOptions, std::time::Duration) {
    use crate::export::ExportTarget;
    let mut args = args.to_vec();
    args.extend(["--otlp-endpoint", "https://collector.example.com:4317"]);
    let (cli, _) = run(&args, env, file).expect("valid");
    let cfg = cli.export_config().expect("valid export settings");
    match cfg.target {
        ExportTarget::Otlp { options, .. } => (options, cfg.timeout),
        ExportTarget::Console => panic!("no endpoint"),
    }
}

fn header_pairs(options: &crate::export::OtlpOptions) -> Vec<(String, String)> {
    options
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

#[test]
fn otlp_settings_from_the_standard_variables_reach_the_exporter() {
    use crate::export::{Compression, OtlpOptions, TlsFiles};
    use std::time::Duration;
    let (options, timeout) = otlp(&[], &[], None);
    assert_eq!(options, OtlpOptions::default());
    assert_eq!(timeout, Duration::from_secs(10), "the specification's 10 s");

    let (options, timeout) = otlp(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/etc/client.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/client.key"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=abc%2C1%3D, x-tenant = t1",
            ),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
        ],
        None,
    );
    assert_eq!(
        options.tls,
        TlsFiles {
            certificate: Some("/etc/ca.pem".into()),
            client_certificate: Some("/etc/client.pem".into()),
            client_key: Some("/etc/client.key".into()),
        }
    );
    assert_eq!(
        header_pairs(&options),
        [
            ("api-key".to_owned(), "abc,1=".to_owned()),
            ("x-tenant".to_owned(), "t1".to_owned())
        ]
    );
    assert_eq!(options.compression, Compression::Gzip);
    assert_eq!(timeout, Duration::from_millis(2500));
    assert!(options.insecure);
}

#[test]
fn otlp_traces_variables_beat_the_generic_ones_and_flags_beat_both() {
    use crate::export::Compression;
    use std::time::Duration;
    let env = [
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/generic/ca.pem"),
        ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/traces/ca.pem"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-generic=1"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-traces=2"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "3000"),
        ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
        ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "false"),
    ];
    let (options, timeout) = otlp(&[], &env, None);
    assert_eq!(
        options.tls.certificate.as_deref(),
        Some(Path::new("/traces/ca.pem"))
    );
    assert_eq!(
        header_pairs(&options),
        [("x-traces".to_owned(), "2".to_owned())],
        "the traces variable replaces the generic list"
    );
    assert_eq!(options.compression, Compression::Gzip);
    assert_eq!(timeout, Duration::from_millis(3000));
    assert!(!options.insecure);

    // The file is below both; flags above everything.
    let file = "otlp_certificate: /file/ca.pem\n\
                otlp_header: {x-file: '3', authorization: Bearer%20t0k}\n\
                otlp_timeout: 4000\n";
    let (options, timeout) = otlp(&[], &[], Some(file));
    assert_eq!(
        options.tls.certificate.as_deref(),
        Some(Path::new("/file/ca.pem"))
    );
    assert_eq!(
        header_pairs(&options),
        [
            ("x-file".to_owned(), "3".to_owned()),
            ("authorization".to_owned(), "Bearer t0k".to_owned())
        ]
    );
    assert_eq!(timeout, Duration::from_millis(4000));
    let (options, timeout) = otlp(&[], &env, Some(file));
    assert_eq!(
        options.tls.certificate.as_deref(),
        Some(Path::new("/traces/ca.pem"))
    );
    assert_eq!(timeout, Duration::from_millis(3000));
    let (options, timeout) = otlp(
        &[
            "--otlp-certificate",
            "/flag/ca.pem",
            "--otlp-header",
            "x-flag=4",
            "--otlp-header",
            "x-flag-2=5",
            "--otlp-timeout",
            "5000",
            "--otlp-compression",
            "none",
        ],
        &env,
        Some(file),
    );
    assert_eq!(
        options.tls.certificate.as_deref(),
        Some(Path::new("/flag/ca.pem"))
    );
    assert_eq!(
        header_pairs(&options),
        [
            ("x-flag".to_owned(), "4".to_owned()),
            ("x-flag-2".to_owned(), "5".to_owned())
        ]
    );
    assert_eq!(timeout, Duration::from_millis(5000));
    assert_eq!(options.compression, Compression::None);
}

#[test]
fn otlp_header_values_never_appear_in_errors() {
    let secret = "hunter2";
    for (args, env, file) in [
        (
            vec!["--otlp-header", "Authorization: Bearer hunter2"],
            vec![],
            None,
        ),
        (
            vec![],
            vec![(
                "OTEL_EXPORTER_OTLP_HEADERS",
                "ok=1,x-key=hunter2%0aInjected",
            )],
            None,
        ),
        (vec![], vec![], Some("otlp_header: [\"Bearer hunter2\"]\n")),
        (
            vec![],
            vec![],
            Some("otlp_header: {x-key: \"hunter2\\x01!\"}\n"),
        ),
    ] {
        let mut argv = args.clone();
        argv.extend(["--otlp-endpoint", "http://c:4318"]);
        let err = match run(&argv, &env, file) {
            Ok((cli, _)) => match cli.export_config() {
                Ok(_) => panic!("accepted {args:?} {env:?} {file:?}"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(err.contains("OTLP header"), "{err}");
        assert!(!err.contains(secret), "a header value in an error: {err}");
        let (cli, _) = run(&argv, &env, file).expect("the loader checks no header value");
        let shown = format!("{cli:?}");
        assert!(!shown.contains(secret), "a header value in Debug: {shown}");
    }
    // Timeouts are positive milliseconds.
    assert!(
        error(&["--otlp-timeout", "0"], &[], None).contains("otlp-timeout"),
        "zero timeout"
    );
    assert!(error(&[], &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")], None).contains("10s"));
    assert!(
        error(&[], &[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")], None)
            .contains("expected one of none, gzip")
    );
}

#[test]
fn key_value_options_take_a_mapping() {
    // Options whose values are KEY=VALUE (Kubernetes labels) accept a YAML mapping.
    for opt in all_options()
        .iter()
        .filter(|o| o.pairs && o.shape == Shape::Many)
    {
        let (_, r) = run(
            &[],
            &[],
            Some(&format!("{}: {{app: web, tier: \"1\"}}\n", opt.key)),
        )
        .expect(&opt.key);
        assert_eq!(
            raw(&r.matches, &opt.id),
            ["app=web", "tier=1"],
            "{}",
            opt.key
        );
    }
}

#[test]
fn every_key_round_trips() {
    let opts = all_options();
    let mut firsts = String::new();
    let mut seconds = String::new();
    for opt in opts.iter().filter(|o| o.key != CONFIG_OPTION) {
        let (a, b) = samples(opt);
        firsts.push_str(&format!(
            "{}: {}\n",
            opt.key,
            yaml_value(opt, std::slice::from_ref(&a))
        ));
        let many = if opt.shape == Shape::Many {
            vec![a, b]
        } else {
            vec![b]
        };
        seconds.push_str(&format!("{}: {}\n", opt.key, yaml_value(opt, &many)));
    }
    for original in ["", firsts.as_str(), seconds.as_str()] {
        let (cli, r) = run(&[], &[], Some(original)).expect(original);
        let dumped = dump(&r.matches);
        let (again_cli, again) = run(&[], &[], Some(&dumped)).expect(&dumped);
        for opt in &opts {
            assert_eq!(
                raw(&again.matches, &opt.id),
                raw(&r.matches, &opt.id),
                "{} did not round-trip through:\n{dumped}",
                opt.key
            );
        }
        assert_eq!(format!("{again_cli:?}"), format!("{cli:?}"));
        assert_eq!(dump(&again.matches), dumped);
    }
    // Both sample files set every key, so each key really went through the file.
    let (_, r) = run(&[], &[], Some(&firsts)).expect("firsts");
    for opt in opts.iter().filter(|o| o.key != CONFIG_OPTION) {
        assert!(
            matches!(r.sources[&opt.key], Source::File { .. }),
            "{} not taken from the file",
            opt.key
        );
    }
}

#[test]
fn unknown_keys_are_placed_with_a_suggestion() {
    let msg = error(&[], &[], Some("capture_size: 1024\ncaptur_size: 2\n"));
    assert_eq!(
        msg,
        format!("{FILE}:2:1: unknown key; did you mean `capture_size`?")
    );

    let msg = error(&[], &[], Some("capture-size: 1024\n"));
    assert!(msg.contains("did you mean `capture_size`"), "{msg}");
    let msg = error(&[], &[], Some("comms: [a]\n"));
    assert!(msg.contains("did you mean `comm`"), "{msg}");

    let msg = error(&[], &[], Some("colour: blue\n"));
    assert!(
        msg.starts_with(&format!("{FILE}:1:1: unknown key; the keys are")),
        "{msg}"
    );
    assert!(msg.contains("capture_size"), "lists the keys: {msg}");
    assert!(
        !msg.contains("colour"),
        "the file's own text is not repeated: {msg}"
    );

    let msg = error(&[], &[], Some("config: /etc/other.yaml\n"));
    assert!(
        msg.contains("unknown key `config`: the file cannot name"),
        "{msg}"
    );
}

#[test]
fn bad_values_are_named_with_key_place_and_reason() {
    let cases: &[(&str, &[&str])] = &[
        (
            "capture_size: lots\n",
            &[
                "test.yaml:1:15: key `capture_size`: invalid value: expected a number of bytes (64 to 8192",
            ],
        ),
        (
            "capture_size: -1\n",
            &["key `capture_size`: invalid value: expected a number of bytes"],
        ),
        (
            "port: [80, 70000]\n",
            &["1:12: key `port`: invalid value: expected a whole number from 1 to 65535"],
        ),
        ("pid: [0]\n", &["key `pid`", "from 1 to 4194304"]),
        (
            "stats_interval: 100000\n",
            &["key `stats_interval`", "from 0 to 86400"],
        ),
        (
            "max_trace_age: 0\n",
            &["key `max_trace_age`", "from 1 to 86400"],
        ),
        (
            "max_spans_per_trace: 0\n",
            &["key `max_spans_per_trace`", "from 1 to 1000000"],
        ),
        (
            "otlp_endpoint: http://collector:0\n",
            &["key `otlp_endpoint`: invalid value: the port must be a number from 1 to 65535"],
        ),
        (
            "otlp_endpoint: ftp://collector\n",
            &["the scheme must be http:// or https://"],
        ),
        (
            "comm: [nginx, \"\"]\n",
            &["1:15: key `comm`", "not an empty value"],
        ),
        (
            "otlp_protocol: json\n",
            &["key `otlp_protocol`: invalid value: expected one of grpc, http/protobuf"],
        ),
        (
            "context_propagation: maybe\n",
            &["key `context_propagation`", "expected one of on, off"],
        ),
        (
            "otlp_endpoint: [a, b]\n",
            &["1:16: key `otlp_endpoint`: takes one value, not a list"],
        ),
        (
            "comm: {a: b}\n",
            &["key `comm`: expected a single value, found a mapping"],
        ),
        ("comm: [[a]]\n", &["key `comm`", "found a list"]),
        (
            "db_raw_query: maybe\n",
            &["key `db_raw_query`: expected true or false"],
        ),
        (
            "db_raw_query: [true]\n",
            &["key `db_raw_query`: expected true or false, found a list"],
        ),
    ];
    for (file, wanted) in cases {
        let msg = error(&[], &[], Some(file));
        for part in *wanted {
            assert!(msg.contains(part), "{file:?}: {msg:?} lacks {part:?}");
        }
    }
}

/// A file that is not a configuration (`--config /etc/shadow`), or one with a secret where a
/// setting should be, must not have its text printed: every way a file can be wrong is tried
/// with a secret in the wrong place.
#[test]
fn errors_never_repeat_the_file_text() {
    const SECRET: &str = "hunter2-s3cr3t";
    let files = [
        // /etc/shadow's first line: a plain scalar that YAML reads as a key.
        format!("root:$y$j9T${SECRET}:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n"),
        format!("{SECRET}: 1\n"),
        format!("password: {SECRET}\n"),
        format!("capture_size: {SECRET}\n"),
        format!("port: [80, {SECRET}]\n"),
        format!("pid: {SECRET}\n"),
        format!("otlp_endpoint: http://user:{SECRET}@collector:0\n"),
        format!("otlp_endpoint: \"http://{SECRET} collector\"\n"),
        format!("db_raw_query: {SECRET}\n"),
        format!("context_propagation: {SECRET}\n"),
        format!("k8s_pod_label: [{SECRET}]\n"),
        format!("comm: [a\n{SECRET}: \"\n"),
        format!("comm: {SECRET}\n\t{SECRET}\n"),
        format!("key: @{SECRET}\n"),
        format!("- {SECRET}\n"),
    ];
    for file in &files {
        let msg = error(&[], &[], Some(file));
        assert!(
            msg.starts_with(FILE) && !msg.contains(SECRET) && !msg.contains("hunter2"),
            "{file:?} gave {msg:?}"
        );
    }
}

fn temp_file(tag: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("agent-config-{tag}-{}", std::process::id()));
    std::fs::write(&path, bytes).expect("write");
    path
}

#[test]
fn large_and_binary_files_are_refused_without_reading_them_whole() {
    let limit = MAX_FILE_BYTES as usize;
    // Exactly the limit: read (a comment, then a setting).
    let mut text = format!("# {}\n", "x".repeat(limit - 22));
    text.push_str("capture_size: 1024\n");
    assert_eq!(text.len(), limit);
    let path = temp_file("limit", text.as_bytes());
    assert_eq!(read_file(&path).expect("at the limit").len(), limit);

    let path_big = temp_file("big", format!("{text} ").as_bytes());
    let err = read_file(&path_big).expect_err("one byte more").to_string();
    assert_eq!(
        err,
        "it is larger than 1 MiB, the most a configuration file may be: is it the right file?"
    );
    // What the user sees, and nothing of the file (a device never ends: /dev/zero).
    let args = |p: &Path| vec![OsString::from("agent"), "--config".into(), p.into()];
    for path in [path_big.as_path(), Path::new("/dev/zero")] {
        let msg = resolve(&args(path), &|_| None, &read_file)
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert_eq!(
            msg,
            format!(
                "cannot read the configuration file {}: it is larger than 1 MiB, the most a \
                 configuration file may be: is it the right file?",
                path.display()
            )
        );
    }

    let secret = b"capture_size: 1024\n\xff\xfe hunter2 \x00";
    let path_bin = temp_file("bin", secret);
    let msg = resolve(&args(&path_bin), &|_| None, &read_file)
        .map(|_| ())
        .expect_err("not text")
        .to_string();
    assert!(
        msg.ends_with(": it is not UTF-8 text: is it the right file?"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2"), "{msg}");
    for p in [path, path_big, path_bin] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn bad_environment_values_name_the_variable() {
    let msg = error(&[], &[("EBPF_AGENT_CAPTURE_SIZE", "lots")], None);
    assert!(
        msg.starts_with(
            "environment variable EBPF_AGENT_CAPTURE_SIZE: option --capture-size: invalid value \"lots\""
        ),
        "{msg}"
    );
    let msg = error(&[], &[("OTEL_EXPORTER_OTLP_PROTOCOL", "json")], None);
    assert!(msg.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{msg}");
    assert!(msg.contains("grpc, http/protobuf"), "{msg}");
    let msg = error(&[], &[("EBPF_AGENT_DB_RAW_QUERY", "perhaps")], None);
    assert!(msg.contains("expected true or false"), "{msg}");
    let msg = error(&[], &[("EBPF_AGENT_PORT", "80,http")], None);
    assert!(
        msg.contains("EBPF_AGENT_PORT") && msg.contains("\"http\""),
        "{msg}"
    );
}

#[test]
fn malformed_files_say_where_and_what() {
    // saphyr's message quotes the character it stumbled on: not repeated.
    let msg = error(&[], &[], Some("comm: @x\n"));
    assert_eq!(
        msg,
        format!("{FILE}:1:7: not valid YAML: unexpected character")
    );
    let msg = error(&[], &[], Some("comm: [a\nport: 1\n"));
    assert!(
        msg.starts_with(FILE) && msg.contains("not valid YAML"),
        "{msg}"
    );

    let msg = error(&[], &[], Some("comm: a\ncomm: b\n"));
    assert!(
        msg.contains("test.yaml:2:") && msg.contains("duplicated key"),
        "{msg}"
    );

    let msg = error(&[], &[], Some("- comm\n- nginx\n"));
    assert!(
        msg.contains("must be a mapping of option names to values"),
        "{msg}"
    );

    let msg = error(&[], &[], Some("comm: [a]\n---\nport: [1]\n"));
    assert!(msg.contains("holds 2 YAML documents"), "{msg}");

    let msg = error(&["--config", "/nonexistent/agent.yaml"], &[], None);
    assert!(
        msg.starts_with("cannot read the configuration file /nonexistent/agent.yaml"),
        "{msg}"
    );

    // Empty and comment-only files set nothing.
    for empty in ["", "# nothing yet\n", "~\n"] {
        let (cli, _) = run(&[], &[], Some(empty)).expect(empty);
        assert_eq!(cli.capture_size, agent_common::DEFAULT_CAPTURE);
    }
}

#[test]
fn command_line_mistakes_stay_clap_errors() {
    assert!(matches!(
        run(&["--no-such-flag"], &[], None),
        Err(ConfigError::CommandLine(_))
    ));
    assert!(matches!(
        run(&["--capture-size", "lots"], &[], None),
        Err(ConfigError::CommandLine(_))
    ));
}

#[test]
fn help_names_each_variable_and_key() {
    let opts = all_options();
    let help = command(&opts).render_long_help().to_string();
    for opt in &opts {
        for var in &opt.env {
            assert!(help.contains(var.as_str()), "--help does not name {var}");
        }
        if opt.key != CONFIG_OPTION {
            assert!(
                help.contains(&format!("[config: {}]", opt.key)),
                "{}",
                opt.key
            );
        }
    }
    assert!(help.contains("Precedence: flags, then environment, then file"));
}

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

#[test]
fn the_example_config_file_is_valid() {
    let path = repo_file("deploy/config.example.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/config.example.yaml");
    let (_, r) = run(&[], &[], Some(&text)).expect("the example is valid");
    let set: Vec<&String> = r
        .sources
        .iter()
        .filter(|(_, s)| matches!(s, Source::File { .. }))
        .map(|(k, _)| k)
        .collect();
    assert!(!set.is_empty(), "the example sets something");
    // Keys shown commented out (`# key: value`) must be valid once uncommented.
    let opts = all_options();
    let mut shown: Vec<String> = set.iter().map(|k| (*k).clone()).collect();
    let mut uncommented = text.clone();
    for line in text.lines() {
        let Some(setting) = line.strip_prefix("# ") else {
            continue;
        };
        let Some((key, _)) = setting.split_once(':') else {
            continue;
        };
        if opts.iter().any(|o| o.key == key) && !shown.iter().any(|k| k == key) {
            uncommented.push_str(&format!("{setting}\n"));
            shown.push(key.to_owned());
        }
    }
    run(&[], &[], Some(&uncommented))
        .unwrap_or_else(|e| panic!("a commented-out example is wrong: {e}"));
}

/// The README's one table: option, environment variables, config key, default.
fn expected_row(opt: &Opt) -> [String; 4] {
    let env = opt
        .env
        .iter()
        .map(|e| format!("`{e}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let key = if opt.key == CONFIG_OPTION {
        "—".to_owned()
    } else {
        format!("`{}`", opt.key)
    };
    let default = match defaults(opt).as_slice() {
        [] => "—".to_owned(),
        values => format!("`{}`", values.join(", ")),
    };
    [format!("`--{}`", opt.long), env, key, default]
}

#[test]
fn the_readme_table_lists_every_option() {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README.md");
    let section = readme
        .split("\n## Configuration")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README.md has a `## Configuration` section");
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect();
    let opts = all_options();
    let table: String = opts
        .iter()
        .map(|o| format!("| {} | |\n", expected_row(o).join(" | ")))
        .collect();
    for opt in &opts {
        let want = expected_row(opt);
        let row = rows.iter().find(|r| r.first() == Some(&want[0]));
        assert!(
            row.is_some_and(|r| r.len() >= 5 && r[..4] == want),
            "README.md's Configuration table is missing or has a wrong row for --{}; the first \
             four columns of every row should be:\n{table}",
            opt.long
        );
    }
    for row in &rows {
        assert!(
            opts.iter()
                .any(|o| Some(&expected_row(o)[0]) == row.first()),
            "README.md documents {:?}, which the agent does not have",
            row.first()
        );
    }
}

#[test]
fn the_kubernetes_configmap_holds_a_valid_config() {
    use saphyr::{LoadableYamlNode as _, Yaml};
    // The plain manifests (rendered from the Helm chart) hand the agent a config file: it must be
    // one this module accepts, or every pod would fail at start-up.
    let dir = repo_file("deploy/kubernetes");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("manifest");
        let docs = Yaml::load_from_str(&text).expect("manifest YAML");
        for doc in &docs {
            if doc["kind"].as_str() != Some("ConfigMap") {
                continue;
            }
            let Some(config) = doc["data"]["config.yaml"].as_str() else {
                continue;
            };
            run(&[], &[], Some(config))
                .unwrap_or_else(|e| panic!("{}: config.yaml: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "no ConfigMap with a config.yaml in deploy/kubernetes"
    );
}
