//! One model = one `.safetensors` file: tensors plus string metadata (the model card).
//!
//! Reading validates everything a rig would otherwise trip over later: truncation, dtype,
//! non-finite values. Shape checks happen where the tensors are compiled into a model, since
//! only there is the expected shape known.

use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// A dense f32 tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor shape and data length differ");
        Tensor { shape, data }
    }
    pub fn vector(data: Vec<f32>) -> Self {
        Tensor { shape: vec![data.len()], data }
    }
    pub fn matrix(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        Self::new(vec![rows, cols], data)
    }
}

/// Tensors by name and the metadata map, as stored on disk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelFile {
    pub meta: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
}

impl ModelFile {
    pub fn read(path: impl AsRef<Path>) -> Result<ModelFile> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|msg| Error::model(path, msg))
    }

    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<ModelFile, String> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| format!("not a readable safetensors file (truncated or corrupt?): {e}"))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let meta = header.metadata().clone().unwrap_or_default().into_iter().collect();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
                Dtype::F64 => {
                    view.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect()
                }
                other => return Err(format!("tensor '{name}' has dtype {other:?}; latentloop reads F32 or F64")),
            };
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(format!("tensor '{name}' has a non-finite value ({}) at flat index {i}", data[i]));
            }
            tensors.insert(name.to_string(), Tensor { shape: view.shape().to_vec(), data });
        }
        Ok(ModelFile { meta, tensors })
    }

    /// The safetensors bytes, written here rather than by the crate (which takes the metadata
    /// as a HashMap) so that the same model always gives the same bytes: header keys sorted,
    /// tensors in name order, header padded to 8 bytes with spaces as the format asks.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(&self.meta).expect("strings serialise"));
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            let len = 4 * t.data.len();
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        let mut json = serde_json::to_vec(&header).expect("header serialises");
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + json.len() + offset);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for t in self.tensors.values() {
            for v in &t.data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Writes atomically (temporary file, then rename) so a crash never leaves half a model.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension("safetensors.partial");
        std::fs::write(&tmp, self.to_bytes()).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// The tensor `name`, which must have exactly `shape`; `what` explains the shape.
    pub fn get(&self, name: &str, shape: &[usize], what: &str) -> std::result::Result<&[f32], String> {
        let t = self.tensors.get(name).ok_or_else(|| format!("missing tensor '{name}' ({what})"))?;
        if t.shape != shape {
            return Err(format!("tensor '{name}' has shape {:?}, expected {:?} ({what})", t.shape, shape));
        }
        Ok(&t.data)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), t);
    }

    /// Metadata value parsed as T; `None` when absent.
    pub fn meta_opt<T: std::str::FromStr>(&self, key: &str) -> std::result::Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.meta.get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|e| format!("metadata '{key}' = '{v}': {e}")),
        }
    }

    pub fn meta_req<T: std::str::FromStr>(&self, key: &str) -> std::result::Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        self.meta_opt(key)?.ok_or_else(|| format!("metadata key '{key}' is missing from the model card"))
    }

    pub fn set_meta(&mut self, key: &str, value: impl ToString) {
        self.meta.insert(key.to_string(), value.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_are_reported() {
        let mut f = ModelFile::default();
        f.insert("a", Tensor::matrix(2, 3, vec![1., 2., 3., 4., 5., 6.]));
        f.set_meta("kind", "xfads");
        let bytes = f.to_bytes();
        assert_eq!(ModelFile::from_bytes(&bytes).unwrap(), f);
        assert_eq!(f.clone().to_bytes(), bytes, "the same model gives the same bytes");
        let err = ModelFile::from_bytes(&bytes[..bytes.len() - 5]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let mut g = f.clone();
        g.tensors.get_mut("a").unwrap().data[4] = f32::NAN;
        let err = ModelFile::from_bytes(&g.to_bytes()).unwrap_err();
        assert!(err.contains("'a'") && err.contains("index 4"), "{err}");
        assert!(f.get("a", &[3, 2], "test").unwrap_err().contains("shape [2, 3], expected [3, 2]"));
        assert!(f.get("b", &[1], "the b vector").unwrap_err().contains("missing tensor 'b'"));
    }
}
