//! The `store:` URL of `plumb.yaml`: which backend holds plumb's state and
//! where. Parsed here once, for `plumb check` and for opening the store.
//!
//! This module knows URLs, not databases: it never connects anywhere.

/// A parsed `store:` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://plumb.db` (relative to the project) or
    /// `sqlite:///absolute/path.db`, optionally `?synchronous=normal`.
    Sqlite {
        /// The file as written (relative paths are the project's).
        file: String,
        /// `synchronous=full` (the default): every commit survives power
        /// loss. `false` for `synchronous=normal`.
        synchronous_full: bool,
    },
    /// `postgres://user@host:5432/database` (or `postgresql://`). Never
    /// with a password: that comes from `PLUMB_STORE_PASSWORD` or
    /// `PLUMB_STORE_PASSWORD_FILE`, because the store cannot hold the key
    /// to itself and `plumb.yaml` is meant to be committed.
    Postgres {
        /// The URL for the driver: as written, without plumb's own options
        /// (`pool`, `notify`), which the driver does not know.
        url: String,
        /// plumb's own options of the URL.
        options: PostgresOptions,
    },
}

/// plumb's own options of a `postgres://` store URL, beside the driver's
/// (`sslmode`, `application_name`, …), which pass through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    /// `pool=N`: connections each process keeps open (default 16). Every
    /// serve and worker opens its own: N processes need N × pool of the
    /// server's `max_connections`.
    pub pool: u32,
    /// `notify=false`: no `LISTEN`/`NOTIFY` (databases that speak
    /// PostgreSQL's protocol without them, or a pooler in transaction
    /// mode): idle workers find new runs by polling, up to ~0.5 s later.
    pub notify: bool,
    /// Whether this process listens for new work (not a URL option: set by
    /// the command). A one-shot command (`plumb status`, `plumb dlq list`)
    /// claims nothing, so it opens no listening connection; it still
    /// announces the runs it queues when `notify` is on.
    pub listen: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool: DEFAULT_POOL,
            notify: true,
            listen: true,
        }
    }
}

impl PostgresOptions {
    /// The options for a one-shot command: no listening connection, and at
    /// most two connections. Each new PostgreSQL connection is a server
    /// process forked and logged in (~4 ms on loopback, more with TLS),
    /// which is most of what a short command costs; two, not one, so a
    /// command that reads while it holds a transaction cannot wait on
    /// itself.
    #[must_use]
    pub fn for_command(self) -> Self {
        Self {
            pool: self.pool.min(COMMAND_POOL),
            listen: false,
            ..self
        }
    }
}

/// The most connections a one-shot command opens (see
/// [`PostgresOptions::for_command`]).
pub const COMMAND_POOL: u32 = 2;

/// Connections per process unless the URL says `pool=N`.
pub const DEFAULT_POOL: u32 = 16;

/// The most connections per process a URL may ask for: beyond it a pool
/// is a typo, and PostgreSQL's own `max_connections` defaults to 100.
pub const MAX_POOL: u32 = 1000;

/// What `plumb check` suggests for a store URL it cannot use.
pub const STORE_URL_HELP: &str = "use `sqlite://plumb.db` (relative to the project), \
    `sqlite:///absolute/path.db` (optionally with `?synchronous=normal`), or \
    `postgres://user@host:5432/database` (optionally with `?pool=16&notify=true`) with the \
    password in PLUMB_STORE_PASSWORD";

/// Parses a `store:` URL.
///
/// # Errors
///
/// A message naming what is wrong: an unknown scheme, a SQLite URL without
/// a file or with an unknown option, a PostgreSQL URL without a host or
/// with a password in it.
pub fn parse_store_url(url: &str) -> Result<StoreUrl, String> {
    if let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
        if file.is_empty() {
            return Err(format!("the store URL `{url}` names no file"));
        }
        let mut synchronous_full = true;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair {
                "synchronous=full" => synchronous_full = true,
                "synchronous=normal" => synchronous_full = false,
                _ => {
                    return Err(format!(
                        "unknown store option `{pair}` in `{url}`; the only option is `synchronous=full|normal`"
                    ));
                }
            }
        }
        return Ok(StoreUrl::Sqlite {
            file: file.to_owned(),
            synchronous_full,
        });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let parsed = url::Url::parse(url)
            .map_err(|e| format!("the store URL `{}` is not a URL: {e}", redact(url)))?;
        if parsed.password().is_some() || parsed.query_pairs().any(|(k, _)| k == "password") {
            return Err(format!(
                "the store URL `{}` holds a password; remove it from plumb.yaml and set \
                 PLUMB_STORE_PASSWORD (or PLUMB_STORE_PASSWORD_FILE, a file holding it)",
                redact(url)
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(format!("the store URL `{url}` names no host"));
        }
        let (url, options) = postgres_options(parsed)?;
        return Ok(StoreUrl::Postgres { url, options });
    }
    Err(format!("unsupported store `{}`", redact(url)))
}

/// plumb's options taken out of a PostgreSQL URL: the URL left for the
/// driver, and the options.
fn postgres_options(mut parsed: url::Url) -> Result<(String, PostgresOptions), String> {
    let mut options = PostgresOptions::default();
    let mut rest: Vec<(String, String)> = Vec::new();
    for (key, value) in parsed.query_pairs() {
        match &*key {
            "pool" => {
                options.pool = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_POOL).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "the store option `pool={value}` is not a number of connections \
                             from 1 to {MAX_POOL} (default {DEFAULT_POOL})"
                        )
                    })?;
            }
            "notify" => {
                options.notify = match &*value {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(format!(
                            "the store option `notify={value}` is neither `true` nor `false`"
                        ));
                    }
                };
            }
            _ => rest.push((key.into_owned(), value.into_owned())),
        }
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    Ok((parsed.to_string(), options))
}

/// The URL without its query and with the password between `://` and `@`
/// blanked, so an error about a URL that holds a password never repeats it.
fn redact(url: &str) -> String {
    let url = url.split_once('?').map_or(url, |(base, _)| base);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The last `@` ends the user info, as URL parsers read it: a password
    // may itself contain `@`.
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_a_file_and_a_durability_mode() {
        assert_eq!(
            parse_store_url("sqlite://plumb.db"),
            Ok(StoreUrl::Sqlite {
                file: "plumb.db".into(),
                synchronous_full: true
            })
        );
        assert_eq!(
            parse_store_url("sqlite:///var/lib/p.db?synchronous=normal"),
            Ok(StoreUrl::Sqlite {
                file: "/var/lib/p.db".into(),
                synchronous_full: false
            })
        );
        assert!(parse_store_url("sqlite://").is_err());
        assert!(parse_store_url("sqlite://x.db?mode=fast").is_err());
    }

    #[test]
    fn postgres_urls_are_accepted_without_a_password() {
        assert_eq!(
            parse_store_url("postgres://plumb@db.internal:5432/plumb"),
            Ok(StoreUrl::Postgres {
                url: "postgres://plumb@db.internal:5432/plumb".into(),
                options: PostgresOptions::default(),
            })
        );
        assert!(parse_store_url("postgresql://plumb@localhost/plumb").is_ok());
    }

    #[test]
    fn plumbs_postgres_options_are_taken_out_and_the_drivers_pass_through() {
        assert_eq!(
            parse_store_url("postgres://plumb@db/plumb?sslmode=require&pool=4&notify=false"),
            Ok(StoreUrl::Postgres {
                url: "postgres://plumb@db/plumb?sslmode=require".into(),
                options: PostgresOptions {
                    pool: 4,
                    notify: false,
                    listen: true,
                },
            })
        );
        assert_eq!(
            parse_store_url("postgres://plumb@db/plumb?pool=64"),
            Ok(StoreUrl::Postgres {
                url: "postgres://plumb@db/plumb".into(),
                options: PostgresOptions {
                    pool: 64,
                    notify: true,
                    listen: true,
                },
            })
        );
        for bad in ["pool=0", "pool=1001", "pool=many", "notify=yes"] {
            let err = parse_store_url(&format!("postgres://plumb@db/plumb?{bad}"))
                .expect_err("a bad option");
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn a_password_in_a_postgres_url_is_refused_without_repeating_it() {
        let err = parse_store_url("postgres://plumb:hunter2@db/plumb").expect_err("password");
        assert!(err.contains("PLUMB_STORE_PASSWORD"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse_store_url("postgres://plumb:p@ss@db/plumb").expect_err("an @ in it");
        assert!(!err.contains("ss@"), "{err}");
        let err = parse_store_url("postgres://plumb@db/plumb?password=hunter2").expect_err("query");
        assert!(err.contains("PLUMB_STORE_PASSWORD"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn other_schemes_are_refused() {
        let err = parse_store_url("mysql://root:pw@db/x").expect_err("mysql");
        assert!(err.contains("unsupported store"), "{err}");
        assert!(!err.contains("pw@"), "{err}");
    }
}
