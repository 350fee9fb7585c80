//! A very small command-line parser: `--key value`, `--key=value` and
//! boolean `--flag`, with every unknown or leftover option an error.

use std::collections::VecDeque;
use std::str::FromStr;

pub struct Args {
    rest: VecDeque<String>,
    /// Options seen so far, for the error message on leftovers.
    known: Vec<&'static str>,
}

impl Args {
    pub fn new(args: impl IntoIterator<Item = String>) -> Self {
        let mut rest = VecDeque::new();
        for a in args {
            // Split `--key=value` once so that lookups see two tokens.
            match a.strip_prefix("--").and_then(|s| s.split_once('=')) {
                Some((k, v)) => {
                    rest.push_back(format!("--{k}"));
                    rest.push_back(v.to_string());
                }
                None => rest.push_back(a),
            }
        }
        Self { rest, known: Vec::new() }
    }

    /// Removes and returns the first positional argument (not starting with `-`).
    pub fn positional(&mut self) -> Option<String> {
        match self.rest.front() {
            Some(a) if !a.starts_with('-') => self.rest.pop_front(),
            _ => None,
        }
    }

    /// `--name` present (a boolean flag)?
    pub fn flag(&mut self, name: &'static str) -> bool {
        self.known.push(name);
        let key = format!("--{name}");
        let mut found = false;
        while let Some(i) = self.rest.iter().position(|a| *a == key) {
            self.rest.remove(i);
            found = true;
        }
        found
    }

    /// Every value of a repeatable `--name VALUE`.
    pub fn values(&mut self, name: &'static str) -> Result<Vec<String>, String> {
        self.known.push(name);
        let key = format!("--{name}");
        let mut out = Vec::new();
        while let Some(i) = self.rest.iter().position(|a| *a == key) {
            self.rest.remove(i);
            match self.rest.remove(i) {
                Some(v) => out.push(v),
                None => return Err(format!("--{name} needs a value")),
            }
        }
        Ok(out)
    }

    /// The last value of `--name VALUE`, if given.
    pub fn opt_str(&mut self, name: &'static str) -> Result<Option<String>, String> {
        Ok(self.values(name)?.pop())
    }

    /// The value of `--name VALUE` parsed as `T`, if given.
    pub fn opt<T: FromStr>(&mut self, name: &'static str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.opt_str(name)? {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|e| format!("--{name} {v:?}: {e}")),
        }
    }

    /// The value of `--name VALUE` parsed as `T`, or `default`.
    pub fn get<T: FromStr>(&mut self, name: &'static str, default: T) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        Ok(self.opt(name)?.unwrap_or(default))
    }

    /// Fails if anything was not consumed.
    pub fn finish(self) -> Result<(), String> {
        if let Some(a) = self.rest.front() {
            return Err(format!("unexpected argument {a:?} (options here: --{})", self.known.join(", --")));
        }
        Ok(())
    }
}

/// Parses `"10s"`, `"1.5"` (seconds), `"500ms"` or `"2m"` into seconds.
pub fn seconds(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("not a duration: {text:?} (e.g. 20, 20s, 500ms, 2m)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("not a duration: {text:?}"));
    }
    Ok(v * scale)
}

/// Parses a duration option given in seconds (with optional unit suffix).
pub fn opt_seconds(args: &mut Args, name: &'static str, default: f64) -> Result<f64, String> {
    match args.opt_str(name)? {
        None => Ok(default),
        Some(v) => seconds(&v).map_err(|e| format!("--{name}: {e}")),
    }
}

/// Parses `"10,25,50"` or `"0.1,0.25"` into fractions (values > 1 are percent).
pub fn fractions(text: &str) -> Result<Vec<f64>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let s = s.trim().trim_end_matches('%');
            let v: f64 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
            let f = if v > 1.0 { v / 100.0 } else { v };
            if f > 0.0 && f <= 10.0 { Ok(f) } else { Err(format!("fraction out of range: {s}")) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let mut a = Args::new(["x", "--rate=5", "--flag", "--duration", "3s"].map(String::from));
        assert_eq!(a.positional().as_deref(), Some("x"));
        assert_eq!(a.get::<u32>("rate", 1).unwrap(), 5);
        assert!(a.flag("flag"));
        assert_eq!(opt_seconds(&mut a, "duration", 0.0).unwrap(), 3.0);
        a.finish().unwrap();
    }

    #[test]
    fn leftovers_are_errors() {
        let a = Args::new(["--nope".to_string()]);
        assert!(a.finish().is_err());
    }

    #[test]
    fn fraction_lists() {
        assert_eq!(fractions("10,50%,1").unwrap(), vec![0.1, 0.5, 1.0]);
        assert_eq!(seconds("500ms").unwrap(), 0.5);
    }
}
