//! Store URLs: `scheme://body?key=value&...`, parsed once and read by each driver.

use std::fmt;
use std::time::Duration;

use crate::{Error, Result};

/// A parsed store URL. Drivers [`take`](Self::take) the options they know and call
/// [`finish`](Self::finish), which rejects any option left over (a typo is an error,
/// not a silent default).
///
/// `Debug` and [`redacted`](Self::redacted) hide passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    scheme: String,
    body: String,
    options: Vec<(String, String)>,
}

impl StoreUrl {
    /// Parses `url`.
    ///
    /// # Errors
    /// [`Error::Config`] if it has no `scheme://`, or an option repeats.
    pub fn parse(url: &str) -> Result<Self> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(Error::config(format!(
                "`{}` is not a store URL: write it as scheme://..., e.g. sqlite://locks.db, memory://, redis://127.0.0.1:6379/",
                redact(url)
            )));
        };
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+')
        {
            return Err(Error::config(format!(
                "`{}` has no valid scheme before `://`; e.g. sqlite://locks.db",
                redact(url)
            )));
        }
        let (body, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut options: Vec<(String, String)> = Vec::new();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if options.iter().any(|(k, _)| *k == key) {
                return Err(Error::config(format!(
                    "option `{key}` appears twice in `{}`; give it once",
                    redact(url)
                )));
            }
            options.push((key.into_owned(), value.into_owned()));
        }
        Ok(Self {
            scheme: scheme.to_ascii_lowercase(),
            body: body.to_owned(),
            options,
        })
    }

    /// The scheme, lower-cased (`sqlite`, `redis`, ...).
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// What stands between `://` and `?`: host list, path, credentials.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// Removes and returns option `key`.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let at = self.options.iter().position(|(k, _)| k == key)?;
        Some(self.options.remove(at).1)
    }

    /// Removes option `key` and reads it as a duration (`500ms`, `10s`, `2m`, `1h`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the option if the value is not a duration.
    pub fn take_duration(&mut self, key: &str) -> Result<Option<Duration>> {
        let Some(value) = self.take(key) else {
            return Ok(None);
        };
        parse_duration(&value)
            .map(Some)
            .map_err(|err| Error::config(format!("option `{key}` of `{self}`: {err}")))
    }

    /// Removes option `key` and reads it as a yes/no switch (`true`/`false`, `1`/`0`,
    /// `yes`/`no`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the option if the value is none of those.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key).as_deref() {
            None => Ok(None),
            Some("true" | "1" | "yes") => Ok(Some(true)),
            Some("false" | "0" | "no") => Ok(Some(false)),
            Some(other) => Err(Error::config(format!(
                "option `{key}` of `{self}` is `{other}`; give true or false"
            ))),
        }
    }

    /// Fails if any option was not taken, naming it and the options `known`.
    ///
    /// # Errors
    /// [`Error::Config`] for the first unknown option.
    pub fn finish(self, known: &[&str]) -> Result<()> {
        match self.options.first() {
            None => Ok(()),
            Some((key, _)) => Err(Error::config(format!(
                "unknown option `{key}` in `{self}`; {} URLs take: {}",
                self.scheme,
                if known.is_empty() {
                    "no options".to_owned()
                } else {
                    known.join(", ")
                }
            ))),
        }
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut out = format!("{}://{}", self.scheme, redact(&self.body));
        for (i, (key, value)) in self.options.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            let value = if key.contains("password") || key.contains("secret") {
                "***"
            } else {
                value
            };
            out.push_str(&format!("{sep}{key}={value}"));
        }
        out
    }
}

/// Replaces the password in every `user:password@` of `text` with `***`.
fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, part) in text.split(',').enumerate() {
        if i > 0 {
            out.push(',');
        }
        match part.rsplit_once('@') {
            Some((userinfo, host)) => {
                let scheme_end = userinfo.find("://").map_or(0, |p| p + 3);
                let (prefix, userinfo) = userinfo.split_at(scheme_end);
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let hidden = if userinfo.contains(':') { ":***" } else { "" };
                out.push_str(&format!("{prefix}{user}{hidden}@{host}"));
            }
            None => out.push_str(part),
        }
    }
    out
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({})", self.redacted())
    }
}

/// Reads a duration written as a whole number with a unit: `250ms`, `10s`, `2m`, `1h`.
///
/// # Errors
/// [`Error::Config`] saying what was expected.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| bad_duration(text))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        _ => return Err(bad_duration(text)),
    };
    Ok(duration)
}

fn bad_duration(text: &str) -> Error {
    Error::config(format!(
        "`{text}` is not a duration: write a whole number with a unit, e.g. 500ms, 10s, 2m, 1h"
    ))
}

/// Decodes `%XX` escapes in a part of a URL (a user name, a password, a path), so it
/// can hold `@`, `:`, `?`, `#` or spaces.
///
/// # Errors
/// What is wrong, to follow the part's name in a message: a `%` not followed by two
/// hex digits, or escapes that decode to bytes that are not UTF-8.
pub fn percent_decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).filter(|h| h.len() == 2);
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(byte) = byte else {
                return Err(format!(
                    "has a `%` not followed by two hex digits at byte {i}; write a literal % as %25"
                ));
            };
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "decodes to bytes that are not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_scheme_body_and_options() {
        let mut url = StoreUrl::parse("SQLite://dir/locks.db?ttl=10s&prefix=a%2Fb").unwrap();
        assert_eq!(url.scheme(), "sqlite");
        assert_eq!(url.body(), "dir/locks.db");
        assert_eq!(
            url.take_duration("ttl").unwrap(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(url.take("prefix").as_deref(), Some("a/b"));
        assert!(url.finish(&["ttl", "prefix"]).is_ok());
    }

    #[test]
    fn leftover_options_are_named_with_the_known_ones() {
        let url = StoreUrl::parse("memory://?tll=5s").unwrap();
        let err = url.finish(&["ttl"]).unwrap_err().to_string();
        assert!(
            err.contains("unknown option `tll`") && err.contains("ttl"),
            "{err}"
        );
    }

    #[test]
    fn a_url_without_scheme_or_with_a_repeated_option_is_refused() {
        let err = StoreUrl::parse("locks.db").unwrap_err().to_string();
        assert!(err.contains("scheme://"), "{err}");
        assert!(StoreUrl::parse("://x").is_err());
        assert!(
            StoreUrl::parse("memory://?ttl=1s&ttl=2s")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }

    #[test]
    fn passwords_never_show_in_debug_display_or_errors() {
        let url = StoreUrl::parse("redis://user:hunter2@h1:1,:pw2@h2:2/?password=x").unwrap();
        for text in [format!("{url:?}"), url.to_string()] {
            assert!(
                !text.contains("hunter2") && !text.contains("pw2") && !text.contains("=x"),
                "{text}"
            );
            assert!(text.contains("user:***@h1:1"), "{text}");
        }
        let err = url.finish(&[]).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = StoreUrl::parse("user:secret@host").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "10", "s", "1.5s", "-1s", "10 parsecs"] {
            assert!(
                parse_duration(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("500ms"),
                "{bad}"
            );
        }
    }

    #[test]
    fn percent_escapes_decode_and_bad_ones_are_named() {
        assert_eq!(percent_decode("a%40b%3Ac").unwrap(), "a@b:c");
        assert!(
            percent_decode("50%")
                .unwrap_err()
                .contains("two hex digits")
        );
        assert!(percent_decode("%ff").unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn switches_read_true_or_false_and_name_a_bad_value() {
        let mut url = StoreUrl::parse("redis://h:1?a=yes&b=0&c=maybe").unwrap();
        assert_eq!(url.take_bool("a").unwrap(), Some(true));
        assert_eq!(url.take_bool("b").unwrap(), Some(false));
        assert_eq!(url.take_bool("d").unwrap(), None);
        let err = url.take_bool("c").unwrap_err().to_string();
        assert!(
            err.contains("`c`") && err.contains("true or false"),
            "{err}"
        );
    }
}
