//! What a benchmark ran on: cores, memory, load, server versions. Every
//! report carries it, since other work on the machine skews every figure.

use serde_json::{Value, json};

/// The 1-, 5- and 15-minute load averages, when the system tells them.
pub fn load_average() -> Option<Vec<f64>> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace()
        .take(3)
        .map(|part| part.parse().ok())
        .collect()
}

/// Cores, memory and load average now.
pub fn facts() -> Value {
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / (1024.0 * 1024.0))
        });
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "memory_gib": memory_gib,
        "load_average": load_average(),
    })
}
