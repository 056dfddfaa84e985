//! TEMPORARY stand-in until the catalog branch merges.
use std::path::{Path, PathBuf};
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    Mlx,
}
impl ModelFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gguf => "gguf",
            Self::Mlx => "mlx",
        }
    }
}
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ModelFacts {
    pub architecture: String,
    pub parameters: u64,
    pub quantization: String,
    pub context_length: u32,
    pub layers: u32,
    pub kv_width: u32,
}
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub format: ModelFormat,
    pub size_bytes: u64,
    pub facts: ModelFacts,
}
impl ModelEntry {
    pub fn kv_bytes(&self, tokens: u64) -> u64 {
        4 * u64::from(self.facts.layers) * u64::from(self.facts.kv_width) * tokens
    }
}
pub struct Catalog {
    entries: Vec<ModelEntry>,
}
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}
#[derive(Debug, thiserror::Error)]
#[error("no model named {name}")]
pub struct UnknownModel {
    pub name: String,
    pub closest: Vec<String>,
}
#[derive(Debug, thiserror::Error)]
#[error("catalog: {0}")]
pub struct CatalogError(String);
impl Catalog {
    pub fn scan(
        dir: Option<&Path>,
        aliases: &[(String, PathBuf)],
        _hf: Option<&Path>,
    ) -> Result<(Catalog, Vec<Skipped>), CatalogError> {
        let mut entries = Vec::new();
        for (name, path) in aliases {
            entries.push(ModelEntry {
                name: name.clone(),
                path: path.clone(),
                format: ModelFormat::Gguf,
                size_bytes: std::fs::metadata(path)
                    .map_err(|e| CatalogError(e.to_string()))?
                    .len(),
                facts: ModelFacts {
                    layers: 30,
                    kv_width: 192,
                    ..Default::default()
                },
            });
        }
        if let Some(dir) = dir {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "gguf") {
                    let name = p.file_stem().unwrap().to_string_lossy().into_owned();
                    if entries.iter().any(|x: &ModelEntry| x.name == name) {
                        continue;
                    }
                    entries.push(ModelEntry {
                        name,
                        size_bytes: std::fs::metadata(&p).unwrap().len(),
                        path: p,
                        format: ModelFormat::Gguf,
                        facts: ModelFacts {
                            layers: 30,
                            kv_width: 192,
                            ..Default::default()
                        },
                    });
                }
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((Catalog { entries }, Vec::new()))
    }
    pub fn from_entries(entries: Vec<ModelEntry>) -> Catalog {
        Catalog { entries }
    }
    pub fn get(&self, name: &str) -> Result<&ModelEntry, UnknownModel> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| UnknownModel {
                name: name.into(),
                closest: vec![],
            })
    }
    pub fn entries(&self) -> &[ModelEntry] {
        &self.entries
    }
}
pub fn parse_alias(s: &str) -> Result<(String, PathBuf), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_owned(), PathBuf::from(b)))
        .ok_or_else(|| "x".to_owned())
}
pub fn closest_names(name: &str, known: &[String]) -> Vec<String> {
    known
        .iter()
        .filter(|k| k.contains(name) || name.contains(k.as_str()))
        .take(3)
        .cloned()
        .collect()
}
impl ModelEntry {
    pub fn read(name: impl Into<String>, path: &Path) -> Result<Self, CatalogError> {
        Ok(ModelEntry {
            name: name.into(),
            path: path.to_owned(),
            format: ModelFormat::Gguf,
            size_bytes: std::fs::metadata(path)
                .map_err(|e| CatalogError(e.to_string()))?
                .len(),
            facts: ModelFacts {
                layers: 30,
                kv_width: 192,
                ..Default::default()
            },
        })
    }
}
