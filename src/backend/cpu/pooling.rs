//! Sentence pooling (mean over real tokens or the CLS token), L2 normalisation, and reading the
//! sentence-transformers files (`modules.json`, `1_Pooling/config.json`) that choose them.

use std::path::Path;

use crate::backend::BackendError;

/// How token states become one sentence embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// Mean over the tokens whose attention mask is 1 (sentence-transformers' default).
    Mean,
    /// The first token's state.
    Cls,
}

impl PoolingMode {
    /// `"mean"` or `"cls"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolingMode::Mean => "mean",
            PoolingMode::Cls => "cls",
        }
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, BackendError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| BackendError::Load(format!("{}: invalid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackendError::Load(format!("{}: {e}", path.display()))),
    }
}

/// Reads the pooling mode and the normalise flag of a sentence-transformers folder: mean pooling
/// and no normalisation when the files are absent; a `Normalize` module in `modules.json` turns
/// normalisation on. Max and sqrt-length pooling are refused with [`BackendError::Load`].
pub fn read_sentence_config(dir: &Path) -> Result<(PoolingMode, bool), BackendError> {
    let modules_path = dir.join("modules.json");
    let mut normalize = false;
    let mut pooling_dir = dir.join("1_Pooling");
    if let Some(modules) = read_json(&modules_path)? {
        let list = modules
            .as_array()
            .ok_or_else(|| BackendError::Load(format!("{}: expected a list of modules", modules_path.display())))?;
        for m in list {
            let kind = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
            if kind.ends_with("Normalize") {
                normalize = true;
            }
            if let Some(p) = m.get("path").and_then(|p| p.as_str())
                && kind.ends_with("Pooling")
            {
                pooling_dir = dir.join(p);
            }
        }
    }
    let cfg_path = pooling_dir.join("config.json");
    let mode = match read_json(&cfg_path)? {
        None => PoolingMode::Mean,
        Some(cfg) => {
            let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
            if flag("pooling_mode_cls_token") {
                PoolingMode::Cls
            } else if flag("pooling_mode_max_tokens") || flag("pooling_mode_mean_sqrt_len_tokens") {
                return Err(BackendError::Load(format!(
                    "{}: only mean and CLS pooling are supported",
                    cfg_path.display()
                )));
            } else {
                PoolingMode::Mean
            }
        }
    };
    Ok((mode, normalize))
}

/// Pools `states` (`[batch, seq, hidden]`) into `out` (`[batch, hidden]`). Mean pooling averages
/// only positions with a nonzero mask (a row with none gives zeros).
pub fn pool(states: &[f32], mask: &[i64], batch: usize, seq: usize, hidden: usize, mode: PoolingMode, out: &mut [f32]) {
    for b in 0..batch {
        let dst = &mut out[b * hidden..(b + 1) * hidden];
        dst.fill(0.0);
        let rows = &states[b * seq * hidden..(b + 1) * seq * hidden];
        match mode {
            PoolingMode::Cls => {
                if seq > 0 {
                    dst.copy_from_slice(&rows[..hidden]);
                }
            }
            PoolingMode::Mean => {
                let mut count = 0usize;
                for (s, row) in rows.chunks_exact(hidden).enumerate() {
                    if mask[b * seq + s] != 0 {
                        count += 1;
                        dst.iter_mut().zip(row).for_each(|(d, v)| *d += v);
                    }
                }
                let inv = 1.0 / count.max(1) as f32;
                dst.iter_mut().for_each(|d| *d *= inv);
            }
        }
    }
}

/// Scales every row of `x` (rows of `dim`) to unit L2 norm (norm clamped below at 1e-12).
pub fn l2_normalize(x: &mut [f32], dim: usize) {
    if dim == 0 {
        return;
    }
    for row in x.chunks_exact_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_skips_padding_and_normalize_scales() {
        let states = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        let mut out = [0.0; 2];
        pool(&states, &[1, 1, 0], 1, 3, 2, PoolingMode::Mean, &mut out);
        assert_eq!(out, [2.0, 3.0]);
        pool(&states, &[1, 1, 0], 1, 3, 2, PoolingMode::Cls, &mut out);
        assert_eq!(out, [1.0, 2.0]);
        let mut v = [3.0, 4.0];
        l2_normalize(&mut v, 2);
        assert_eq!(v, [0.6, 0.8]);
    }

    #[test]
    fn reads_sentence_transformers_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(read_sentence_config(dir.path()).ok(), Some((PoolingMode::Mean, false)));
        let modules = r#"[{"type":"sentence_transformers.models.Pooling","path":"1_Pooling"},
                          {"type":"sentence_transformers.models.Normalize","path":"2_Normalize"}]"#;
        assert!(std::fs::write(dir.path().join("modules.json"), modules).is_ok());
        assert!(std::fs::create_dir(dir.path().join("1_Pooling")).is_ok());
        let cfg = r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#;
        assert!(std::fs::write(dir.path().join("1_Pooling/config.json"), cfg).is_ok());
        assert_eq!(read_sentence_config(dir.path()).ok(), Some((PoolingMode::Cls, true)));
    }
}
