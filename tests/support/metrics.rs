//! Prometheus text exposition, read the way a test or the benchmark needs it: the samples of
//! one metric, their labels, sums over label subsets, and histogram buckets with the bucket
//! holding a quantile.

use std::collections::HashMap;

/// `(labels, value)` of every sample named exactly `name`; `labels` is the raw text between
/// the braces (empty without labels). Lines whose value is not a number are left out.
pub fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = match head.find('{') {
            Some(at) => (&head[..at], head[at + 1..].trim_end_matches('}')),
            None => (head, ""),
        };
        if n == name {
            if let Ok(v) = value.trim().parse::<f64>() {
                out.push((labels, v));
            }
        }
    }
    out
}

/// The value of label `key` in raw label text, as written (escapes are not undone: use
/// [`parse_labels`] for values that may hold quotes or backslashes).
pub fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=\"");
    let mut from = 0;
    // `key="` must start the text or follow a comma: `provider=` is not inside `xprovider=`.
    loop {
        let at = from + labels[from..].find(&pat)?;
        let starts_label = at == 0 || labels[..at].ends_with(',');
        let start = at + pat.len();
        if starts_label {
            let len = labels[start..].find('"')?;
            return Some(&labels[start..start + len]);
        }
        from = start;
    }
}

/// `k="v",k2="v2"` -> pairs (values unescaped).
pub fn parse_labels(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        rest = &after[end..];
    }
    out
}

/// Sum of the series of `name` whose labels include `labels`; `None` if there is none.
/// Panics on a matching series whose value is not a number.
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in body.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
            None => (series, HashMap::new()),
        };
        if series_name != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| series_labels.get(*k).map(String::as_str) == Some(*v))
        {
            let v: f64 = value
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("bad metric value in {line:?}: {e}"));
            total = Some(total.unwrap_or(0.0) + v);
        }
    }
    total
}

/// As [`metric`], 0 when there is no such series.
pub fn metric_sum(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(body, name, labels).unwrap_or(0.0)
}

/// Cumulative buckets `(le, count)` of histogram `name` (without `_bucket`), summed over its
/// label sets, in ascending `le`; `+Inf` is `f64::INFINITY`.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for (labels, v) in samples(text, &format!("{name}_bucket")) {
        let le = match label(labels, "le") {
            Some("+Inf") => f64::INFINITY,
            Some(s) => match s.parse() {
                Ok(x) => x,
                Err(_) => continue,
            },
            None => continue,
        };
        match by_le.iter_mut().find(|(l, _)| *l == le) {
            Some(e) => e.1 += v,
            None => by_le.push((le, v)),
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
}

/// Upper bound of the bucket holding quantile `q` of the observations made between two
/// [`buckets`] readings (`after - before`); `None` if there were none.
pub fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let base = |le: f64| {
        before
            .iter()
            .find(|(l, _)| *l == le)
            .map_or(0.0, |(_, c)| *c)
    };
    let diff: Vec<(f64, f64)> = after.iter().map(|(le, c)| (*le, c - base(*le))).collect();
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    diff.iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}
