//! Which content objects `check --read-data-subset` reads back: `N%` or a size (a random sample, a
//! fresh one each run), or `n/m` (the n-th of m fixed slices of the address space, so that m runs,
//! one a night say, read everything once; restic's spelling).
//!
//! Slices are cut by the first 8 bytes of the content address, which are uniformly distributed:
//! each object is in exactly one slice, whatever else the store holds, and stays in it.

use std::str::FromStr;

use rand::seq::SliceRandom;

use crate::error::{Error, Result};
use crate::format::ContentId;

/// What part of the content to read back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subset {
    /// Every object.
    All,
    /// A random `N` percent of the objects (0 < N ≤ 100).
    Percent(f64),
    /// Random objects until this many stored bytes are read.
    Bytes(u64),
    /// Slice `n` of `m` (1 ≤ n ≤ m).
    Slice { n: u32, m: u32 },
}

impl std::fmt::Display for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subset::All => write!(f, "all"),
            Subset::Percent(p) => write!(f, "{p}%"),
            Subset::Bytes(b) => write!(f, "{b} bytes"),
            Subset::Slice { n, m } => write!(f, "{n}/{m}"),
        }
    }
}

fn bad(spec: &str, why: &str) -> Error {
    Error::Usage(format!(
        "--read-data-subset {spec:?}: {why}; give a percentage (`5%`), a size (`50G`, `500MiB`) or a slice (`3/7`: the third of seven parts, so that seven runs read everything)"
    ))
}

impl FromStr for Subset {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Subset> {
        let s = spec.trim();
        if let Some((n, m)) = s.split_once('/') {
            let (n, m): (u32, u32) = match (n.trim().parse(), m.trim().parse()) {
                (Ok(n), Ok(m)) => (n, m),
                _ => return Err(bad(spec, "a slice is two whole numbers")),
            };
            if m == 0 || n == 0 || n > m {
                return Err(bad(spec, "a slice n/m needs 1 ≤ n ≤ m"));
            }
            return Ok(Subset::Slice { n, m });
        }
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad(spec, "not a number"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad(spec, "a percentage is above 0 and at most 100"));
            }
            return Ok(Subset::Percent(p));
        }
        parse_size(s)
            .filter(|b| *b > 0)
            .map(Subset::Bytes)
            .ok_or_else(|| bad(spec, "not a percentage, a size or a slice"))
    }
}

/// `50G`, `500MiB`, `1.5T`, `4096`: binary units (K = 1024), as restic reads them.
fn parse_size(s: &str) -> Option<u64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    let bytes = number * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// The slice (1..=m) that address `id` falls in.
pub fn slice_of(id: &ContentId, m: u32) -> u32 {
    let x = u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"));
    ((x as u128 * m as u128) >> 64) as u32 + 1
}

/// Choose from `candidates` (address, stored size) what `subset` reads.
pub fn select(subset: Subset, mut candidates: Vec<(ContentId, u64)>) -> Vec<(ContentId, u64)> {
    match subset {
        Subset::All => candidates,
        Subset::Slice { n, m } => {
            candidates.retain(|(id, _)| slice_of(id, m) == n);
            candidates
        }
        Subset::Percent(p) => {
            candidates.shuffle(&mut rand::thread_rng());
            let take = (candidates.len() as f64 * p / 100.0).ceil() as usize;
            candidates.truncate(take.min(candidates.len()));
            candidates
        }
        Subset::Bytes(limit) => {
            candidates.shuffle(&mut rand::thread_rng());
            let mut sum = 0u64;
            let take = candidates
                .iter()
                .take_while(|(_, size)| {
                    let under = sum < limit;
                    sum += size;
                    under
                })
                .count();
            candidates.truncate(take);
            candidates
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<(ContentId, u64)> {
        (0..n)
            .map(|i| {
                (
                    ContentId(*blake3::hash(&i.to_le_bytes()).as_bytes()),
                    100 + i as u64,
                )
            })
            .collect()
    }

    #[test]
    fn specs_parse_and_bad_ones_name_the_forms() {
        assert_eq!("5%".parse::<Subset>().unwrap(), Subset::Percent(5.0));
        assert_eq!("2.5 %".parse::<Subset>().unwrap(), Subset::Percent(2.5));
        assert_eq!(
            "3/7".parse::<Subset>().unwrap(),
            Subset::Slice { n: 3, m: 7 }
        );
        assert_eq!("50G".parse::<Subset>().unwrap(), Subset::Bytes(50 << 30));
        assert_eq!(
            "500MiB".parse::<Subset>().unwrap(),
            Subset::Bytes(500 << 20)
        );
        assert_eq!("1.5k".parse::<Subset>().unwrap(), Subset::Bytes(1536));
        assert_eq!("4096".parse::<Subset>().unwrap(), Subset::Bytes(4096));
        for bad in [
            "0%",
            "101%",
            "0/3",
            "4/3",
            "1/0",
            "x",
            "5 parsecs",
            "",
            "-1%",
            "0",
        ] {
            let err = bad.parse::<Subset>().unwrap_err().to_string();
            assert!(
                err.contains("--read-data-subset") && err.contains("3/7"),
                "{bad}: {err}"
            );
        }
    }

    /// m runs of n/m read every object exactly once.
    #[test]
    fn slices_partition_the_objects() {
        let all = ids(5000);
        for m in [1u32, 2, 3, 7, 16] {
            let mut seen: Vec<ContentId> = Vec::new();
            for n in 1..=m {
                let part = select(Subset::Slice { n, m }, all.clone());
                assert!(
                    part.len() > all.len() / m as usize / 2,
                    "slice {n}/{m} has {} objects: not spread",
                    part.len()
                );
                seen.extend(part.into_iter().map(|(id, _)| id));
            }
            seen.sort();
            let mut want: Vec<ContentId> = all.iter().map(|(id, _)| *id).collect();
            want.sort();
            assert_eq!(seen, want, "m = {m}");
        }
    }

    #[test]
    fn percentages_and_sizes_pick_that_much() {
        let all = ids(1000);
        assert_eq!(select(Subset::Percent(10.0), all.clone()).len(), 100);
        assert_eq!(select(Subset::Percent(0.01), all.clone()).len(), 1);
        assert_eq!(select(Subset::Percent(100.0), all.clone()).len(), 1000);
        let picked = select(Subset::Bytes(10_000), all.clone());
        let bytes: u64 = picked.iter().map(|(_, s)| s).sum();
        let last = picked.last().unwrap().1;
        assert!(bytes >= 10_000 && bytes - last < 10_000, "{bytes}");
        assert_eq!(select(Subset::Bytes(u64::MAX), all.clone()).len(), 1000);
        assert_eq!(select(Subset::All, all).len(), 1000);
    }
}
