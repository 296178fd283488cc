use proptest::prelude::*;

use super::*;

/// Fails once, listing every row whose output differs from the expected one.
fn assert_rows(what: &str, rows: Vec<(String, String, String)>) {
    let count = rows.len();
    let failures: Vec<String> = rows
        .into_iter()
        .filter(|(_, want, got)| want != got)
        .map(|(input, want, got)| format!("  {input}\n    want {want}\n    got  {got}"))
        .collect();
    assert!(
        failures.is_empty(),
        "{what}: {} of {count} rows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSJ9.c2lnbmF0dXJlLXNpZw";

fn redact_cmd(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.replace("<jwt>", JWT)).collect();
    command_line(&args)
}

/// Command line (arguments as the kernel holds them) → `process.command_line`.
const COMMAND_LINES: &[(&[&str], &str)] = &[
    // SQL given to a client: literals become `?` like in db.query.text.
    (
        &[
            "psql",
            "-h",
            "db",
            "-c",
            "SELECT * FROM users WHERE email = 'alice@example.com' AND password = 'hunter2'",
        ],
        "psql -h db -c SELECT * FROM users WHERE email = ? AND password = ?",
    ),
    (
        &["psql", "-c", "CREATE ROLE app LOGIN PASSWORD 'hunter2'"],
        "psql -c CREATE ROLE app LOGIN PASSWORD ?",
    ),
    (
        &[
            "/usr/bin/psql",
            "--command=ALTER USER app WITH PASSWORD 'pw'",
        ],
        "/usr/bin/psql --command=ALTER USER app WITH PASSWORD ?",
    ),
    (
        &["mysql", "-e", "UPDATE users SET pw='x' WHERE id=7"],
        "mysql -e UPDATE users SET pw=? WHERE id=?",
    ),
    (
        &[
            "sqlite3",
            "app.db",
            "INSERT INTO t VALUES ('alice@example.com', 42)",
        ],
        "sqlite3 app.db INSERT INTO t VALUES (?, ?)",
    ),
    // `-p` is a port for psql and redis-cli, a password for mysql. psql's `--password` takes
    // no value, but what follows it may be a password typed there: hidden like one.
    (
        &["psql", "-h", "db", "-p", "5432", "-U", "app", "-W", "appdb"],
        "psql -h db -p 5432 -U app -W appdb",
    ),
    (
        &["psql", "--password", "hunter2"],
        "psql --password REDACTED",
    ),
    (
        &["ssh", "-p", "22", "deploy.internal"],
        "ssh -p 22 deploy.internal",
    ),
    (
        &["mysql", "-u", "root", "-phunter2", "shop"],
        "mysql -u root -pREDACTED shop",
    ),
    (
        &["mysql", "-u", "root", "-p", "hunter2", "db"],
        "mysql -u root -p REDACTED db",
    ),
    (
        &[
            "redis-cli",
            "-h",
            "cache",
            "-p",
            "6379",
            "-a",
            "s3cret",
            "ping",
        ],
        "redis-cli -h cache -p 6379 -a REDACTED ping",
    ),
    (
        &["sshpass", "-p", "hunter2", "ssh", "host"],
        "sshpass -p REDACTED ssh host",
    ),
    (
        &["ldapsearch", "-D", "cn=admin", "-w", "hunter2"],
        "ldapsearch -D cn=admin -w REDACTED",
    ),
    (
        &["smbclient", "//srv/share", "-U", "alice%pw"],
        "smbclient //srv/share -U alice%REDACTED",
    ),
    // curl/wget credentials and headers.
    (
        &[
            "curl",
            "-u",
            "alice:pass",
            "https://api.example.com/v1/items",
        ],
        "curl -u alice:REDACTED https://api.example.com/v1/items",
    ),
    (
        &["curl", "--user=alice:pass", "http://h/"],
        "curl --user=alice:REDACTED http://h/",
    ),
    (
        &["curl", "-ualice:pass", "http://h/"],
        "curl -ualice:REDACTED http://h/",
    ),
    (
        &["curl", "-u", "alice", "http://h/"],
        "curl -u alice http://h/",
    ),
    (
        &["curl", "-H", "Authorization: Bearer <jwt>", "http://h/"],
        "curl -H Authorization: Bearer REDACTED http://h/",
    ),
    (
        &[
            "curl",
            "--header=Proxy-Authorization: Basic YWxpY2U6cGFzcw==",
            "http://h/",
        ],
        "curl --header=Proxy-Authorization: Basic REDACTED http://h/",
    ),
    (
        &["curl", "-H", "X-Api-Key: 0123abcd", "http://h/"],
        "curl -H X-Api-Key: REDACTED http://h/",
    ),
    (
        &["curl", "-H", "Cookie: session=abc; theme=dark", "http://h/"],
        "curl -H Cookie: REDACTED http://h/",
    ),
    (
        &["curl", "-b", "session=abc", "http://h/"],
        "curl -b REDACTED http://h/",
    ),
    (
        &["curl", "-H", "Accept: text/html", "http://h/"],
        "curl -H Accept: text/html http://h/",
    ),
    (
        &[
            "curl",
            "-d",
            r#"{"user":"alice","password":"hunter2"}"#,
            "http://h/login",
        ],
        r#"curl -d {"user":"alice","password":REDACTED} http://h/login"#,
    ),
    (
        &["wget", "--user=alice", "--password=hunter2", "http://h/f"],
        "wget --user=alice --password=REDACTED http://h/f",
    ),
    (
        &[
            "git",
            "-c",
            "http.extraHeader=Authorization: Basic YWxpY2U6cGFzcw==",
            "clone",
            "https://h/r.git",
        ],
        "git -c http.extraHeader=Authorization: Basic REDACTED clone https://h/r.git",
    ),
    (
        &["app", "--auth", "Bearer abcdef123456"],
        "app --auth REDACTED",
    ),
    (
        &["app", "--header", "Bearer abcdef123456"],
        "app --header Bearer REDACTED",
    ),
    // Options and environment-like arguments named as secrets.
    (
        &["app", "--password=hunter2", "--port=80"],
        "app --password=REDACTED --port=80",
    ),
    (
        &["app", "--password", "hunter2", "--port", "80"],
        "app --password REDACTED --port 80",
    ),
    (
        &["app", "--password", "--verbose"],
        "app --password --verbose",
    ),
    (
        &["app", "--token", "abc", "--api-key", "def"],
        "app --token REDACTED --api-key REDACTED",
    ),
    (
        &["app", "--secret", "abc", "--client-secret=def"],
        "app --secret REDACTED --client-secret=REDACTED",
    ),
    (
        &["app", "--DB_PASSWORD", "s3cr3t"],
        "app --DB_PASSWORD REDACTED",
    ),
    (
        &["app", "-Dspring.datasource.password=x"],
        "app -Dspring.datasource.password=REDACTED",
    ),
    (
        &[
            "env",
            "PGPASSWORD=hunter2",
            "psql",
            "-h",
            "db",
            "-c",
            "SELECT 1",
        ],
        "env PGPASSWORD=REDACTED psql -h db -c SELECT ?",
    ),
    (
        &["app", "MYSQL_PWD=x", "AWS_SECRET_ACCESS_KEY=zzz"],
        "app MYSQL_PWD=REDACTED AWS_SECRET_ACCESS_KEY=REDACTED",
    ),
    (
        &["app", "GITHUB_TOKEN=zzz", "token=abc", "key=k1"],
        "app GITHUB_TOKEN=REDACTED token=REDACTED key=REDACTED",
    ),
    (
        &["keytool", "-storepass", "changeit", "-list"],
        "keytool -storepass REDACTED -list",
    ),
    (
        &["openssl", "rsa", "-passin", "pass:hunter2", "-in", "k.pem"],
        "openssl rsa -passin REDACTED -in k.pem",
    ),
    (&["app", "--tls-key=pass:hunter2"], "app --tls-key=REDACTED"),
    (
        &["app", "--key-file", "/etc/app/key.pem"],
        "app --key-file /etc/app/key.pem",
    ),
    (
        &["app", "--password-file", "/run/secrets/db"],
        "app --password-file /run/secrets/db",
    ),
    (
        &[
            "docker",
            "login",
            "--password-stdin",
            "registry.example.com",
        ],
        "docker login --password-stdin registry.example.com",
    ),
    (
        &["app", "--no-password", "appdb"],
        "app --no-password appdb",
    ),
    // Connection strings.
    (
        &[
            "app",
            "--db",
            "postgresql://app:hunter2@db.internal:5432/shop?sslmode=require",
        ],
        "app --db postgresql://app:REDACTED@db.internal:5432/shop?sslmode=REDACTED",
    ),
    (
        &["app", "redis://:pw@cache:6379"],
        "app redis://:REDACTED@cache:6379",
    ),
    (
        &["psql", "host=db user=app password=hunter2 dbname=shop"],
        "psql host=db user=app password=REDACTED dbname=shop",
    ),
    (
        &["psql", "host=db password='my secret' dbname=shop"],
        "psql host=db password=REDACTED dbname=shop",
    ),
    (
        &[
            "app",
            "Server=db;Database=shop;User Id=app;Password=hunter2;",
        ],
        "app Server=db;Database=shop;User Id=app;Password=REDACTED;",
    ),
    (
        &["app", "--dsn=app:hunter2@tcp(db:3306)/shop"],
        "app --dsn=app:REDACTED@tcp(db:3306)/shop",
    ),
    (
        &[
            "java",
            "-jar",
            "app.jar",
            "--spring.datasource.url=jdbc:postgresql://db/shop?user=app&password=pw",
        ],
        "java -jar app.jar --spring.datasource.url=jdbc:postgresql://db/shop?user=REDACTED&password=REDACTED",
    ),
    // URLs: userinfo, path tokens, query and fragment values.
    (
        &[
            "curl",
            "http://h:8080/u/alice@example.com/token/<jwt>?k=secret",
        ],
        "curl http://h:8080/u/REDACTED/token/REDACTED?k=REDACTED",
    ),
    (
        &["curl", "http://h/u/alice%40example.com/orders/42"],
        "curl http://h/u/REDACTED/orders/42",
    ),
    (
        &["curl", "http://h/s?alice%40example.com=1&page=2"],
        "curl http://h/s?REDACTED=REDACTED&page=REDACTED",
    ),
    (
        &["app", "http://example.com:8080/path?q=1"],
        "app http://example.com:8080/path?q=REDACTED",
    ),
    (
        &["app", "https://h/cb#access_token=abc&state=1"],
        "app https://h/cb#access_token=REDACTED&state=REDACTED",
    ),
    (
        &["app", "https://h/docs#install"],
        "app https://h/docs#install",
    ),
    (
        &[
            "git",
            "clone",
            "https://ghp_16C7e42F292c6912E7710c838347Ae178B4a@github.com/org/repo.git",
        ],
        "git clone https://REDACTED@github.com/org/repo.git",
    ),
    (
        &["git", "clone", "https://alice%40example.com:pw@h/r.git"],
        "git clone https://REDACTED:REDACTED@h/r.git",
    ),
    (
        &["git", "clone", "https://bob@host/r.git"],
        "git clone https://bob@host/r.git",
    ),
    (
        &["app", "--url=https://u:p@h/x,https://v:q@k/y"],
        "app --url=https://u:REDACTED@h/x,https://v:REDACTED@k/y",
    ),
    // E-mail addresses, JWTs, vendor tokens anywhere.
    (
        &["app", "--admin-email", "alice@example.com"],
        "app --admin-email REDACTED@example.com",
    ),
    (
        &["app", "--notify=alice%40example.com"],
        "app --notify=REDACTED%40example.com",
    ),
    (&["app", "--id-token", "<jwt>"], "app --id-token REDACTED"),
    (&["app", "--jwt=<jwt>"], "app --jwt=REDACTED"),
    (&["app", "X-Session: <jwt>"], "app X-Session: REDACTED"),
    (
        &["app", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"],
        "app REDACTED",
    ),
    (
        &["aws", "--access", "AKIAIOSFODNN7EXAMPLE"],
        "aws --access REDACTED",
    ),
    (
        &["npm", "install", "react@18.2.0"],
        "npm install react@18.2.0",
    ),
    // Scripts: each command of the script redacted like a command line.
    (
        &[
            "bash",
            "-c",
            r#"PGPASSWORD=x psql -h db -c "ALTER ROLE app PASSWORD 'pw'"; curl -u a:b http://h/"#,
        ],
        "bash -c PGPASSWORD=REDACTED psql -h db -c ALTER ROLE app PASSWORD ? ; curl -u a:REDACTED http://h/",
    ),
    (
        &["sh", "-ec", "mysql -phunter2 shop"],
        "sh -ec mysql -pREDACTED shop",
    ),
    // Harmless command lines are kept as they are.
    (
        &["python3", "-m", "http.server", "8080"],
        "python3 -m http.server 8080",
    ),
    (&["nginx", "-g", "daemon off;"], "nginx -g daemon off;"),
    (
        &["app", "--port=80", "--log-level=debug", "--workers", "4"],
        "app --port=80 --log-level=debug --workers 4",
    ),
    (
        &["java", "-Xmx1g", "-jar", "app.jar"],
        "java -Xmx1g -jar app.jar",
    ),
    (
        &[
            "app",
            "--keyboard",
            "us",
            "mode=fast",
            "--bypass-cache",
            "x",
        ],
        "app --keyboard us mode=fast --bypass-cache x",
    ),
    (
        &["app", "é=1", "ü-token=x", "ключ=значение"],
        "app é=1 ü-token=REDACTED ключ=значение",
    ),
];

#[test]
fn command_line_table() {
    let rows = COMMAND_LINES
        .iter()
        .map(|(args, want)| {
            (
                args.join(" | "),
                want.replace("<jwt>", JWT),
                redact_cmd(args),
            )
        })
        .collect();
    assert_rows("process.command_line", rows);
}

/// Request path → (span name path, `url.path`).
const PATHS: &[(&str, &str, &str)] = &[
    ("", "/", ""),
    ("/", "/", "/"),
    ("/api/v1/items", "/api/v1/items", "/api/v1/items"),
    ("/users/123", "/users/{id}", "/users/123"),
    ("/u/42/p/7", "/u/{id}/p/{id}", "/u/42/p/7"),
    (
        "/o/550e8400-e29b-41d4-a716-446655440000/x",
        "/o/{id}/x",
        "/o/550e8400-e29b-41d4-a716-446655440000/x",
    ),
    ("/days/2024-01-15", "/days/{id}", "/days/2024-01-15"),
    (
        "/u/alice@example.com/token/<jwt>",
        "/u/{id}/token/{id}",
        "/u/REDACTED/token/REDACTED",
    ),
    (
        "/u/alice%40example.com/orders",
        "/u/{id}/orders",
        "/u/REDACTED/orders",
    ),
    ("/u/ALICE%40Example.COM", "/u/{id}", "/u/REDACTED"),
    (
        "/avatars/alice@example.com.png",
        "/avatars/{id}",
        "/avatars/REDACTED",
    ),
    (
        "/search/name:alice@example.com",
        "/search/{id}",
        "/search/REDACTED",
    ),
    ("/t/eyJ1c2VyIjoiYWxpY2UifQ", "/t/{id}", "/t/REDACTED"),
    ("/t/Bearer%20<jwt>", "/t/{id}", "/t/REDACTED"),
    (
        "/files/5f2b8c9e1a7d3b6f4e0c9a8b",
        "/files/{id}",
        "/files/REDACTED",
    ),
    (
        "/reset/Zk3q9XwP2mL7vB1nR8tY",
        "/reset/{id}",
        "/reset/REDACTED",
    ),
    (
        "/keys/ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        "/keys/{id}",
        "/keys/REDACTED",
    ),
    (
        "/app;jsessionid=1A2B3C4D5E6F/cart",
        "/app/cart",
        "/app;jsessionid=REDACTED/cart",
    ),
    (
        "/blog/2024-01-15-my-first-post",
        "/blog/2024-01-15-my-first-post",
        "/blog/2024-01-15-my-first-post",
    ),
    (
        "/npm/react@18.2.0/index.js",
        "/npm/react@18.2.0/index.js",
        "/npm/react@18.2.0/index.js",
    ),
    (
        "/listAllOrdersForCustomer",
        "/listAllOrdersForCustomer",
        "/listAllOrdersForCustomer",
    ),
    (
        "/releases/v2.10.1/notes",
        "/releases/v2.10.1/notes",
        "/releases/v2.10.1/notes",
    ),
    ("/@alice/posts", "/@alice/posts", "/@alice/posts"),
];

#[test]
fn path_table() {
    let rows = PATHS
        .iter()
        .map(|(path, template, redacted)| {
            let path = path.replace("<jwt>", JWT);
            let forms = url_path(&path);
            let got = format!("{} {}", forms.template, forms.redacted);
            let want = format!("{template} {}", redacted.replace("<jwt>", JWT));
            (path, want, got)
        })
        .collect();
    assert_rows("span name path and url.path", rows);
}

/// Query string → `url.query`.
const QUERIES: &[(&str, &str)] = &[
    ("", ""),
    ("page=1", "page=REDACTED"),
    ("a=1&b&c=", "a=REDACTED&b&c=REDACTED"),
    ("a&&b=x=y", "a&&b=REDACTED"),
    ("=v", "=REDACTED"),
    ("token=abc&debug", "token=REDACTED&debug"),
    ("alice@example.com=1", "REDACTED=REDACTED"),
    ("alice%40example.com", "REDACTED"),
    ("<jwt>", "REDACTED"),
    ("12345", "12345"),
];

#[test]
fn query_table() {
    let rows = QUERIES
        .iter()
        .map(|(query, want)| {
            let query = query.replace("<jwt>", JWT);
            let got = url_query(&query);
            (query, want.to_string(), got)
        })
        .collect();
    assert_rows("url.query", rows);
}

/// Free text (User-Agent, error messages) → exported text.
const FREE_TEXT: &[(&str, &str)] = &[
    ("curl/7.88.1", "curl/7.88.1"),
    (
        "MyCrawler/1.0 (+mailto:ops@example.com)",
        "MyCrawler/1.0 (+mailto:REDACTED@example.com)",
    ),
    (
        r#"invalid input syntax for type uuid: "alice@example.com""#,
        r#"invalid input syntax for type uuid: "REDACTED@example.com""#,
    ),
    ("session <jwt> expired", "session REDACTED expired"),
    (
        "Authorization: bearer abc.def",
        "Authorization: bearer REDACTED",
    ),
    ("react@18.2.0 and @scope/pkg", "react@18.2.0 and @scope/pkg"),
];

#[test]
fn free_text_table() {
    let rows = FREE_TEXT
        .iter()
        .map(|(text, want)| {
            let text = text.replace("<jwt>", JWT);
            let got = free_text(&text).into_owned();
            (text, want.to_string(), got)
        })
        .collect();
    assert_rows("free text", rows);
}

#[test]
fn shell_words_split_like_a_shell() {
    assert_eq!(
        shell_words(r#"a 'b c' "d \"e\"" f\ g;h && i|j"#),
        ["a", "b c", r#"d "e""#, "f g", ";", "h", "&&", "i", "|", "j"]
    );
    assert_eq!(shell_words("'unterminated"), ["unterminated"]);
    assert!(shell_words("").is_empty());
}

#[test]
fn long_command_lines_are_cut_after_redaction() {
    let mut args = vec!["app".to_string()];
    args.extend((0..2000).map(|i| format!("--password=secret{i}")));
    let out = command_line(&args);
    assert!(out.len() <= MAX_COMMAND_LINE_LEN + '…'.len_utf8());
    assert!(out.ends_with('…'));
    assert!(!out.contains("secret"), "{out}");
}

/// Ways a secret `S` appears on a command line; each must lose `S`. `--` ends whatever the
/// arbitrary argument before it started (a flag waiting for its value).
fn secret_forms(s: &str) -> Vec<Vec<String>> {
    [
        vec!["--password".to_string(), s.to_string()],
        vec![format!("--token={s}")],
        vec![format!("--api-key={s}")],
        vec![format!("PGPASSWORD={s}")],
        vec![format!("host=db password={s} dbname=x")],
        vec![format!("postgresql://app:{s}@db/x")],
        vec![format!("http://h/p?k={s}")],
        vec![format!("http://h/u/{s}@example.com/x")],
        vec![format!("http://h/u/{s}%40example.com")],
        vec!["-H".to_string(), format!("Authorization: Bearer {s}")],
        vec!["-H".to_string(), format!("X-Api-Key: {s}")],
        vec![format!("{s}@example.com")],
        vec![format!("eyJhbGciOiJIUzI1NiJ9.{s}.c2ln")],
        vec![format!("--dsn=app:{s}@tcp(db)/x")],
        ["--", "curl", "-u"]
            .iter()
            .map(|a| a.to_string())
            .chain([format!("u:{s}")])
            .collect(),
        ["--", "psql", "-c"]
            .iter()
            .map(|a| a.to_string())
            .chain([format!("SELECT 'x{s}'")])
            .collect(),
        vec!["--".into(), "mysql".into(), format!("-p{s}")],
        vec![format!("ALTER ROLE app PASSWORD '{s}'")],
    ]
    .into()
}

proptest! {
    #[test]
    fn command_line_never_panics(args in prop::collection::vec(".{0,60}", 0..8)) {
        let _ = command_line(&args);
    }

    #[test]
    fn command_line_never_panics_on_shell_like_text(
        program in prop::sample::select(vec!["psql", "curl", "mysql", "bash", "app"]),
        args in prop::collection::vec("[ -~]{0,40}", 0..8),
    ) {
        let mut all = vec![program.to_string()];
        all.extend(args);
        let _ = command_line(&all);
    }

    #[test]
    fn an_inserted_secret_never_survives(
        program in prop::sample::select(vec!["psql", "curl", "mysql", "python3", "/usr/bin/app"]),
        args in prop::collection::vec("[ -~]{0,24}", 0..6),
        secret in "Zq[a-z0-9]{8,12}",
        form in 0usize..18,
        at in 0usize..6,
    ) {
        // A shell would take arbitrary text as a script: scripts have their own rows above.
        prop_assume!(!args.iter().any(|a| known_program(a).is_some_and(|p| SHELLS.contains(&p))));
        let mut all = vec![program.to_string()];
        all.extend(args);
        let forms = secret_forms(&secret);
        let at = 1 + at.min(all.len() - 1);
        all.splice(at..at, forms[form % forms.len()].clone());
        let out = command_line(&all);
        prop_assert!(!out.contains(&secret), "{:?}\n→ {}", all, out);
    }

    #[test]
    fn paths_queries_and_text_never_panic(s in ".{0,80}", bytes in "[%@a-zA-Z0-9./;=&_-]{0,60}") {
        for text in [&s, &bytes] {
            let forms = url_path(text);
            prop_assert!(!forms.template.is_empty());
            let _ = url_query(text);
            let _ = free_text(text);
        }
    }

    #[test]
    fn sensitive_segments_never_survive(
        segments in prop::collection::vec("[a-zA-Z0-9._~-]{0,12}", 0..6),
        secret in "Zq[a-z0-9]{8,12}",
        form in 0usize..4,
        at in 0usize..6,
    ) {
        let sensitive = [
            format!("{secret}@example.com"),
            format!("{secret}%40example.com"),
            format!("eyJhbGciOiJIUzI1NiJ9.{secret}.c2ln"),
            format!("ghp_{secret}{secret}"),
        ];
        let mut segments = segments;
        let at = at.min(segments.len());
        segments.insert(at, sensitive[form].clone());
        let path = format!("/{}", segments.join("/"));
        let forms = url_path(&path);
        prop_assert!(!forms.template.contains(&secret), "{} → {}", path, forms.template);
        prop_assert!(!forms.redacted.contains(&secret), "{} → {}", path, forms.redacted);
        let query = format!("{}={}&{}", segments.join("="), secret, sensitive[form]);
        let redacted_query = url_query(&query);
        prop_assert!(!redacted_query.contains(&secret), "{} → {}", query, redacted_query);
    }

    #[test]
    fn query_keeps_every_pair_and_no_value(query in "[a-z=&%0-9]{0,24}") {
        let out = url_query(&query);
        let pairs: Vec<&str> = query.split('&').collect();
        let redacted: Vec<&str> = out.split('&').collect();
        prop_assert_eq!(pairs.len(), redacted.len());
        for (pair, r) in pairs.iter().zip(&redacted) {
            match pair.split_once('=') {
                Some(_) => prop_assert!(r.ends_with("=REDACTED"), "{} → {}", pair, r),
                None => prop_assert!(*r == *pair || *r == REDACTED, "{} → {}", pair, r),
            }
        }
    }
}
