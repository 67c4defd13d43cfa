//! `--log`, `--log-format` and `--debug`: entries in runc's formats, so the
//! clients that read runc's log file (conmon reads the last `msg` of a failed
//! call from `--log-format json`) read ours the same way.
//!
//! text: `time="2026-11-23T10:00:00.000000000Z" level=error msg="..."`
//! json: `{"level":"error","msg":"...","time":"2026-11-23T10:00:00.000000000Z"}`

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log-format {0:?}: expected text or json")]
    Format(String),
    #[error("--log {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn parse(name: &str) -> Result<Self, LogError> {
        match name {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(LogError::Format(other.to_string())),
        }
    }
}

/// Where entries go: the `--log` file, else stderr.
enum Sink {
    File(Mutex<File>),
    Stderr,
}

/// This process's `--log`, `--log-format` and `--debug`, for the processes
/// it starts in the background (the monitor), whose entries belong in the
/// same log.
static SETTINGS: OnceLock<(Option<PathBuf>, LogFormat, bool)> = OnceLock::new();

/// Adds this process's log flags to `cmd`.
pub fn forward_flags(cmd: &mut Command) {
    if let Some((path, format, debug)) = SETTINGS.get() {
        if let Some(p) = path {
            cmd.arg("--log").arg(p);
        }
        cmd.arg("--log-format").arg(match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        });
        if *debug {
            cmd.arg("--debug");
        }
    }
}

pub struct Logger {
    sink: Sink,
    format: LogFormat,
    level: log::LevelFilter,
}

/// Installs the logger for this process. Without `--log` and `--debug`
/// nothing is logged: the command's error is printed on stderr by `main`
/// (as runc prints it), and a second copy there would only be noise.
/// With `service`, informational messages go to stderr even without a log
/// file (a long-running service's journal: `husk pool`).
pub fn init(
    path: Option<&Path>,
    format: LogFormat,
    debug: bool,
    service: bool,
) -> Result<(), LogError> {
    let _ = SETTINGS.set((path.map(Path::to_path_buf), format, debug));
    let sink = match path {
        Some(p) => Sink::File(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| LogError::Open {
                    path: p.display().to_string(),
                    source,
                })?,
        )),
        None => Sink::Stderr,
    };
    let level = match (path.is_some(), debug) {
        (_, true) => log::LevelFilter::Debug,
        (true, false) => log::LevelFilter::Info,
        (false, false) if service => log::LevelFilter::Info,
        (false, false) => log::LevelFilter::Off,
    };
    let logger = Logger {
        sink,
        format,
        level,
    };
    // A second init in one process (never done) would keep the first logger.
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(level);
    }
    Ok(())
}

impl Logger {
    fn entry(&self, level: log::Level, msg: &str) -> String {
        // logrus's names, which runc's readers expect.
        let level = match level {
            log::Level::Error => "error",
            log::Level::Warn => "warning",
            log::Level::Info => "info",
            log::Level::Debug => "debug",
            log::Level::Trace => "trace",
        };
        let time = rfc3339_nanos(SystemTime::now());
        match self.format {
            LogFormat::Text => format!(
                "time=\"{time}\" level={level} msg={}\n",
                serde_json::Value::String(msg.to_string())
            ),
            LogFormat::Json => {
                let mut line =
                    serde_json::json!({ "level": level, "msg": msg, "time": time }).to_string();
                line.push('\n');
                line
            }
        }
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = self.entry(record.level(), &record.args().to_string());
        // One write per entry, so entries of the monitor and of later
        // commands appending to the same file do not interleave.
        let _ = match &self.sink {
            Sink::File(f) => match f.lock() {
                Ok(mut f) => f.write_all(line.as_bytes()),
                Err(_) => Ok(()),
            },
            Sink::Stderr => std::io::stderr().write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {}
}

/// `SystemTime` as RFC 3339 in UTC with nanoseconds, as runc (logrus) writes.
pub fn rfc3339_nanos(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let t = UNIX_EPOCH + Duration::new(1_795_426_200, 5);
        assert_eq!(rfc3339_nanos(t), "2026-11-23T09:30:00.000000005Z");
    }

    #[test]
    fn entries_have_runc_shape() {
        for (format, expect) in [
            (LogFormat::Text, "level=error msg=\"bad \\\"id\\\"\""),
            (
                LogFormat::Json,
                "\"level\":\"error\",\"msg\":\"bad \\\"id\\\"\"",
            ),
        ] {
            let logger = Logger {
                sink: Sink::Stderr,
                format,
                level: log::LevelFilter::Info,
            };
            let line = logger.entry(log::Level::Error, "bad \"id\"");
            assert!(line.contains(expect), "{line}");
            assert!(line.ends_with('\n'));
        }
        let json = Logger {
            sink: Sink::Stderr,
            format: LogFormat::Json,
            level: log::LevelFilter::Info,
        }
        .entry(log::Level::Warn, "x");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["level"], "warning");
        assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(LogFormat::parse("yaml").is_err());
    }
}
