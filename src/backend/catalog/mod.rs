//! The model catalog: which models this service can serve, by name, with the
//! facts residency needs to place them (size, context, KV width), read from
//! file headers without loading any model.
//!
//! Sources, in the order their names are claimed:
//! 1. explicit aliases (`--models NAME=PATH`): the operator asked for them,
//!    so one that cannot be read fails startup;
//! 2. the models directory: `*.gguf` files and MLX directories (a
//!    `config.json` beside `*.safetensors` and a tokenizer) directly in it,
//!    and one level further inside sub-directories that are not models
//!    themselves (`dir/tiny/x.gguf`, `dir/mlx-community/Phi-3-mini/`), so an
//!    organised tree works while a scan stays two `read_dir` levels deep;
//! 3. a Hugging Face hub cache: each `models--ORG--NAME`'s newest snapshot,
//!    named `ORG/NAME`.
//!
//! What is found but cannot be read is skipped and reported for a warning,
//! so one broken download does not stop the service.

mod gguf;
mod mlx_dir;

use std::{
    collections::HashSet,
    fmt, fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

pub use gguf::ggml_type_name;

const GGUF_EXTENSION: &str = "gguf";
/// A Hugging Face hub cache names a model repository `models--ORG--NAME`.
const HF_MODEL_PREFIX: &str = "models--";
const HF_SEPARATOR: &str = "--";
/// How many close names an unknown-model error offers.
const CLOSEST_NAMES: usize = 3;
/// Bytes of one f16 KV-cache element.
const KV_ELEMENT_BYTES: u64 = 2;

/// How a model is stored, which decides the runtime that can load it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// One GGUF file (llama.cpp).
    Gguf,
    /// A Hugging Face layout directory of safetensors (MLX).
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

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a model's headers say about it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFacts {
    /// GGUF `general.architecture`; config.json `model_type`.
    pub architecture: String,
    /// Sum of the tensors' element counts (quantized MLX weights unpacked).
    pub parameters: u64,
    /// GGUF: the ggml type holding the most elements (`Q4_1`, `F16`), else
    /// `general.file_type`; MLX: `4-bit`/`8-bit` when quantized, else the
    /// dominant dtype (`bf16`, `f16`, `f32`).
    pub quantization: String,
    /// Positions the model was trained for.
    pub context_length: u32,
    pub layers: u32,
    /// Per-token width of K (and of V) in one layer: KV heads × head size.
    pub kv_width: u32,
}

/// One servable model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub format: ModelFormat,
    /// On disk: the GGUF file, or the directory's weight, config and
    /// tokenizer files.
    pub size_bytes: u64,
    pub facts: ModelFacts,
}

impl ModelEntry {
    /// Reads a GGUF file or an MLX directory (config.json + *.safetensors +
    /// tokenizer.json or tokenizer.model).
    pub fn read(name: impl Into<String>, path: &Path) -> Result<Self, CatalogError> {
        let metadata = fs::metadata(path).map_err(|source| CatalogError::io(path, source))?;
        let (format, facts, size_bytes) = if metadata.is_dir() {
            if !mlx_dir::is_model_dir(path) {
                return Err(CatalogError::invalid(
                    path,
                    format!("a directory without {}", mlx_dir::CONFIG),
                ));
            }
            let (facts, size_bytes) = mlx_dir::read(path)?;
            (ModelFormat::Mlx, facts, size_bytes)
        } else {
            (ModelFormat::Gguf, gguf::read(path)?, metadata.len())
        };
        Ok(Self {
            name: name.into(),
            path: path.to_path_buf(),
            format,
            size_bytes,
            facts,
        })
    }

    /// Bytes of f16 KV cache for `tokens` positions: K and V, every layer.
    pub fn kv_bytes(&self, tokens: u64) -> u64 {
        2u64.saturating_mul(u64::from(self.facts.layers))
            .saturating_mul(u64::from(self.facts.kv_width))
            .saturating_mul(KV_ELEMENT_BYTES)
            .saturating_mul(tokens)
    }
}

/// The models this service can serve, sorted by name, names unique.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    entries: Vec<ModelEntry>,
}

/// A model found by a scan but left out, with why (for a warning).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// A request named a model the catalog does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no model named {name}; {}", known_names(closest))]
pub struct UnknownModel {
    pub name: String,
    /// Up to three known names, closest first.
    pub closest: Vec<String>,
}

fn known_names(closest: &[String]) -> String {
    if closest.is_empty() {
        "known: none".into()
    } else {
        format!("closest: {}", closest.join(", "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not a readable model: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("model {name}: {source}")]
    Alias {
        name: String,
        #[source]
        source: Box<CatalogError>,
    },
    #[error("--models names {name} twice ({} and {})", first.display(), second.display())]
    DuplicateAlias {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
}

impl CatalogError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// A model a scan found, before it is read.
struct Candidate {
    name: String,
    path: PathBuf,
}

impl Catalog {
    /// Builds the catalog from the models directory, the aliases and the
    /// Hugging Face cache (see the module doc for what is scanned).
    ///
    /// A missing `dir` or `hf_cache` is reported as skipped, not an error:
    /// the default models directory need not exist. An alias that cannot be
    /// read is an error; an alias for a path the scan also finds replaces the
    /// scanned name. Of two scanned models with one name the first by path
    /// wins and the other is reported as skipped.
    pub fn scan(
        dir: Option<&Path>,
        aliases: &[(String, PathBuf)],
        hf_cache: Option<&Path>,
    ) -> Result<(Catalog, Vec<Skipped>), CatalogError> {
        let mut entries: Vec<ModelEntry> = Vec::new();
        for (name, path) in aliases {
            if let Some(first) = entries.iter().find(|entry| entry.name == *name) {
                return Err(CatalogError::DuplicateAlias {
                    name: name.clone(),
                    first: first.path.clone(),
                    second: path.clone(),
                });
            }
            let entry =
                ModelEntry::read(name.clone(), path).map_err(|source| CatalogError::Alias {
                    name: name.clone(),
                    source: Box::new(source),
                })?;
            entries.push(entry);
        }
        let aliased: HashSet<PathBuf> = entries.iter().map(|entry| identity(&entry.path)).collect();

        let mut skipped = Vec::new();
        let mut candidates = Vec::new();
        if let Some(dir) = dir {
            candidates.extend(scan_models_dir(dir, &mut skipped)?);
        }
        if let Some(cache) = hf_cache {
            candidates.extend(scan_hf_cache(cache, &mut skipped)?);
        }
        for Candidate { name, path } in candidates {
            if aliased.contains(&identity(&path)) {
                continue;
            }
            if let Some(first) = entries.iter().find(|entry| entry.name == name) {
                skipped.push(Skipped {
                    reason: format!(
                        "the name {name} is taken by {}; give this one a --models alias",
                        first.path.display()
                    ),
                    path,
                });
                continue;
            }
            match ModelEntry::read(name, &path) {
                Ok(entry) => entries.push(entry),
                Err(error) => skipped.push(Skipped {
                    path,
                    reason: error_reason(error),
                }),
            }
        }
        Ok((Self::from_entries(entries), skipped))
    }

    /// A catalog of `entries`; of two with one name the first is kept.
    pub fn from_entries(entries: Vec<ModelEntry>) -> Catalog {
        let mut seen = HashSet::new();
        let mut entries: Vec<ModelEntry> = entries
            .into_iter()
            .filter(|entry| seen.insert(entry.name.clone()))
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Self { entries }
    }

    pub fn get(&self, name: &str) -> Result<&ModelEntry, UnknownModel> {
        match self
            .entries
            .binary_search_by(|entry| entry.name.as_str().cmp(name))
        {
            Ok(index) => Ok(&self.entries[index]),
            Err(_) => Err(UnknownModel {
                name: name.to_owned(),
                closest: closest_names(name, self.entries.iter().map(|entry| entry.name.as_str())),
            }),
        }
    }

    pub fn entries(&self) -> &[ModelEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A skip reason without the path, which the skip already names.
fn error_reason(error: CatalogError) -> String {
    match error {
        CatalogError::Invalid { reason, .. } => reason,
        CatalogError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// A path with its directory resolved but not its last component, so an
/// alias matches the scanned path it names even when spelled differently,
/// while two symlinks to one file stay two models.
fn identity(path: &Path) -> PathBuf {
    let resolved = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            fs::canonicalize(parent)
                .map(|parent| parent.join(name))
                .ok()
        }
        _ => None,
    };
    resolved.unwrap_or_else(|| path.to_path_buf())
}

/// Sorted entries of `dir`, without hidden ones.
fn list_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if !file_name(&path).starts_with('.') {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// The entries of a directory the caller named; a missing one is a warning
/// (the default models directory need not exist), any other failure an error.
fn list_root(dir: &Path, skipped: &mut Vec<Skipped>) -> Result<Vec<PathBuf>, CatalogError> {
    match list_dir(dir) {
        Ok(paths) => Ok(paths),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            skipped.push(Skipped {
                path: dir.to_path_buf(),
                reason: "no such directory".into(),
            });
            Ok(Vec::new())
        }
        Err(source) => Err(CatalogError::io(dir, source)),
    }
}

/// The model name requests use for a model at `path`: a directory's name,
/// or a GGUF file's name without `.gguf`.
pub fn model_name(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("")
}

fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == GGUF_EXTENSION) && path.is_file()
}

/// The model a path is, if it is one: a `.gguf` file named by its stem, or a
/// directory with config.json named by itself.
fn as_candidate(path: &Path) -> Option<Candidate> {
    let name = if is_gguf(path) {
        path.file_stem()?.to_str()?
    } else if path.is_dir() && mlx_dir::is_model_dir(path) {
        path.file_name()?.to_str()?
    } else {
        return None;
    };
    Some(Candidate {
        name: name.to_owned(),
        path: path.to_path_buf(),
    })
}

fn scan_models_dir(dir: &Path, skipped: &mut Vec<Skipped>) -> Result<Vec<Candidate>, CatalogError> {
    let mut candidates = Vec::new();
    for path in list_root(dir, skipped)? {
        if let Some(candidate) = as_candidate(&path) {
            candidates.push(candidate);
        } else if path.is_dir() {
            // An unreadable sub-directory is a warning, not a failed scan.
            match list_dir(&path) {
                Ok(inner) => candidates.extend(inner.iter().filter_map(|path| as_candidate(path))),
                Err(error) => skipped.push(Skipped {
                    path,
                    reason: error.to_string(),
                }),
            }
        }
    }
    Ok(candidates)
}

/// Each `models--ORG--NAME`'s newest snapshot that is an MLX directory or
/// holds exactly one `.gguf` file.
fn scan_hf_cache(cache: &Path, skipped: &mut Vec<Skipped>) -> Result<Vec<Candidate>, CatalogError> {
    let mut candidates = Vec::new();
    for repo in list_root(cache, skipped)? {
        let Some(repo_id) = file_name(&repo).strip_prefix(HF_MODEL_PREFIX) else {
            continue;
        };
        let name = repo_id.replacen(HF_SEPARATOR, "/", 1);
        let Some(snapshot) = newest_snapshot(&repo) else {
            continue;
        };
        if mlx_dir::is_model_dir(&snapshot) {
            candidates.push(Candidate {
                name,
                path: snapshot,
            });
            continue;
        }
        let ggufs: Vec<PathBuf> = fs::read_dir(&snapshot)
            .map_err(|source| CatalogError::io(&snapshot, source))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| is_gguf(path))
            .collect();
        match ggufs.as_slice() {
            [] => {}
            [path] => candidates.push(Candidate {
                name,
                path: path.clone(),
            }),
            _ => skipped.push(Skipped {
                path: snapshot,
                reason: format!(
                    "{} .gguf files; name the one to serve with --models",
                    ggufs.len()
                ),
            }),
        }
    }
    Ok(candidates)
}

/// The snapshot `refs/main` points at, else the most recently modified one.
fn newest_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(revision) = fs::read_to_string(repo.join("refs/main")) {
        let snapshot = snapshots.join(revision.trim());
        if snapshot.is_dir() {
            return Some(snapshot);
        }
    }
    fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let modified = entry
                .metadata()
                .ok()?
                .modified()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Some((modified, entry.path()))
        })
        .filter(|(_, path)| path.is_dir())
        .max()
        .map(|(_, path)| path)
}

/// Up to [`CLOSEST_NAMES`] of `known`, closest to `asked` first: names that
/// contain it or are contained in it (case-insensitively), then by edit
/// distance.
pub fn closest_names<'a>(asked: &str, known: impl Iterator<Item = &'a str>) -> Vec<String> {
    let asked = asked.to_lowercase();
    let mut ranked: Vec<(bool, usize, &str)> = known
        .map(|name| {
            let lower = name.to_lowercase();
            let related = lower.contains(&asked) || asked.contains(&lower);
            (!related, edit_distance(&asked, &lower), name)
        })
        .collect();
    ranked.sort();
    ranked
        .into_iter()
        .take(CLOSEST_NAMES)
        .map(|(_, _, name)| name.to_owned())
        .collect()
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::{gguf::tests::write_tiny_llama, mlx_dir::tests::write_tiny_mlx, *};

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(label: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "rigger-catalog-{label}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const MLX_TENSORS: &[(&str, &str, &[u64])] = &[("model.norm.weight", "F16", &[64])];

    fn names(catalog: &Catalog) -> Vec<&str> {
        catalog.entries().iter().map(|e| e.name.as_str()).collect()
    }

    #[test]
    fn scans_gguf_files_mlx_dirs_and_one_level_below() {
        let dir = TempDir::new("scan");
        let root = dir.path();
        write_tiny_llama(&root.join("tiny.gguf"));
        write_tiny_mlx(&root.join("tiny-mistral"), json!({}), MLX_TENSORS);
        fs::create_dir_all(root.join("family/deeper/too-deep")).expect("mkdir");
        write_tiny_llama(&root.join("family/nested.gguf"));
        write_tiny_mlx(&root.join("family/nested-mlx"), json!({}), MLX_TENSORS);
        write_tiny_llama(&root.join("family/deeper/too-deep/hidden.gguf"));
        // A sentence-embedding directory: weights and tokenizer, no config.
        fs::create_dir_all(root.join("wordllama")).expect("mkdir");
        fs::write(root.join("wordllama/tokenizer.json"), "{}").expect("write");
        fs::write(root.join("notes.txt"), "not a model").expect("write");
        fs::write(root.join("broken.gguf"), "GGUF").expect("write");

        let (catalog, skipped) = Catalog::scan(Some(root), &[], None).expect("scan");
        assert_eq!(
            names(&catalog),
            ["nested", "nested-mlx", "tiny", "tiny-mistral"]
        );
        let mistral = catalog.get("tiny-mistral").expect("mlx entry");
        assert_eq!(mistral.format, ModelFormat::Mlx);
        assert_eq!(catalog.get("tiny").expect("gguf").format.as_str(), "gguf");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].path, root.join("broken.gguf"));
        assert!(skipped[0].reason.contains("truncated"), "{}", skipped[0]);
    }

    #[test]
    fn duplicate_names_keep_the_first_by_path() {
        let dir = TempDir::new("duplicates");
        let root = dir.path();
        fs::create_dir_all(root.join("a")).expect("mkdir");
        fs::create_dir_all(root.join("b")).expect("mkdir");
        write_tiny_llama(&root.join("a/same.gguf"));
        write_tiny_llama(&root.join("b/same.gguf"));
        let (catalog, skipped) = Catalog::scan(Some(root), &[], None).expect("scan");
        assert_eq!(names(&catalog), ["same"]);
        assert_eq!(
            catalog.get("same").expect("kept").path,
            root.join("a/same.gguf")
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].path, root.join("b/same.gguf"));
        assert!(skipped[0].reason.contains("taken by"), "{}", skipped[0]);
    }

    #[test]
    fn an_alias_replaces_the_scanned_name_and_a_bad_alias_fails() {
        let dir = TempDir::new("aliases");
        let root = dir.path();
        write_tiny_llama(&root.join("tiny.gguf"));
        write_tiny_llama(&root.join("other.gguf"));
        // Spelled through `..`: the same file as the scan's.
        let spelled = root.join("sub/../tiny.gguf");
        fs::create_dir_all(root.join("sub")).expect("mkdir");
        let aliases = [("fast".to_owned(), spelled)];
        let (catalog, skipped) = Catalog::scan(Some(root), &aliases, None).expect("scan");
        assert_eq!(names(&catalog), ["fast", "other"]);
        assert!(skipped.is_empty(), "{skipped:?}");

        let taken = [("other".to_owned(), root.join("tiny.gguf"))];
        let (catalog, skipped) = Catalog::scan(Some(root), &taken, None).expect("scan");
        assert_eq!(
            catalog.get("other").expect("alias").path,
            root.join("tiny.gguf")
        );
        assert_eq!(skipped.len(), 1, "the scanned other.gguf loses its name");

        let missing = [("gone".to_owned(), root.join("gone.gguf"))];
        let error = Catalog::scan(Some(root), &missing, None).expect_err("unreadable alias");
        assert!(error.to_string().starts_with("model gone: "), "{error}");

        let twice = [
            ("x".to_owned(), root.join("tiny.gguf")),
            ("x".to_owned(), root.join("other.gguf")),
        ];
        let error = Catalog::scan(None, &twice, None).expect_err("duplicate alias");
        assert!(
            matches!(error, CatalogError::DuplicateAlias { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_missing_models_dir_is_a_warning() {
        let dir = TempDir::new("missing");
        let gone = dir.path().join("nowhere");
        let (catalog, skipped) = Catalog::scan(Some(&gone), &[], None).expect("scan");
        assert!(catalog.is_empty());
        assert_eq!(
            skipped,
            [Skipped {
                path: gone,
                reason: "no such directory".into()
            }]
        );
    }

    #[test]
    fn hf_cache_snapshots_are_named_org_slash_name() {
        let dir = TempDir::new("hf");
        let cache = dir.path();
        let mlx_repo = cache.join("models--mlx-community--Tiny-Mistral-4bit");
        write_tiny_mlx(&mlx_repo.join("snapshots/old"), json!({}), MLX_TENSORS);
        write_tiny_mlx(
            &mlx_repo.join("snapshots/abc123"),
            json!({"max_position_embeddings": 8192}),
            MLX_TENSORS,
        );
        fs::create_dir_all(mlx_repo.join("refs")).expect("mkdir");
        fs::write(mlx_repo.join("refs/main"), "abc123\n").expect("write ref");

        let gguf_repo = cache.join("models--bartowski--Tiny-GGUF/snapshots/r1");
        fs::create_dir_all(&gguf_repo).expect("mkdir");
        write_tiny_llama(&gguf_repo.join("tiny-Q4_1.gguf"));

        let two = cache.join("models--someone--Two-GGUF/snapshots/r1");
        fs::create_dir_all(&two).expect("mkdir");
        write_tiny_llama(&two.join("a.gguf"));
        write_tiny_llama(&two.join("b.gguf"));

        fs::create_dir_all(cache.join("datasets--someone--data/snapshots/r1")).expect("mkdir");

        let (catalog, skipped) = Catalog::scan(None, &[], Some(cache)).expect("scan");
        assert_eq!(
            names(&catalog),
            ["bartowski/Tiny-GGUF", "mlx-community/Tiny-Mistral-4bit"]
        );
        let mlx = catalog.get("mlx-community/Tiny-Mistral-4bit").expect("mlx");
        assert_eq!(mlx.path, mlx_repo.join("snapshots/abc123"));
        assert_eq!(mlx.facts.context_length, 8192);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].reason.contains("2 .gguf files"),
            "{}",
            skipped[0]
        );
    }

    #[test]
    fn unknown_names_offer_the_closest() {
        let dir = TempDir::new("closest");
        let path = dir.path().join("m.gguf");
        write_tiny_llama(&path);
        let entry = ModelEntry::read("m", &path).expect("read");
        let named = |name: &str| ModelEntry {
            name: name.into(),
            ..entry.clone()
        };
        let catalog = Catalog::from_entries(
            [
                "phi3-mini",
                "mistral-7b",
                "llama3.1-8b",
                "orca2",
                "SmolLM2-135M",
            ]
            .map(named)
            .into(),
        );
        let error = catalog.get("smollm2").expect_err("unknown");
        assert_eq!(
            error.closest[0], "SmolLM2-135M",
            "contained counts as close"
        );
        assert_eq!(error.closest.len(), 3);

        let error = catalog.get("mistrel-7b").expect_err("unknown");
        assert_eq!(error.closest[0], "mistral-7b");
        assert!(
            error
                .to_string()
                .starts_with("no model named mistrel-7b; closest: mistral-7b, "),
            "{error}"
        );

        let empty = Catalog::from_entries(Vec::new())
            .get("x")
            .expect_err("empty");
        assert_eq!(empty.to_string(), "no model named x; known: none");
    }

    #[test]
    fn from_entries_sorts_and_keeps_the_first_of_a_name() {
        let dir = TempDir::new("entries");
        let path = dir.path().join("m.gguf");
        write_tiny_llama(&path);
        let entry = ModelEntry::read("m", &path).expect("read");
        let make = |name: &str, size_bytes| ModelEntry {
            name: name.into(),
            size_bytes,
            ..entry.clone()
        };
        let catalog = Catalog::from_entries(vec![make("b", 1), make("a", 2), make("b", 3)]);
        assert_eq!(names(&catalog), ["a", "b"]);
        assert_eq!(catalog.get("b").expect("b").size_bytes, 1);
    }

    #[test]
    fn kv_bytes_counts_k_and_v_of_every_layer_in_f16() {
        let dir = TempDir::new("kv");
        let path = dir.path().join("m.gguf");
        write_tiny_llama(&path);
        let entry = ModelEntry::read("m", &path).expect("read");
        // 2 layers, KV width 16: K and V, 2 bytes each, per position.
        assert_eq!(entry.kv_bytes(1000), 2 * 2 * 16 * 2 * 1000);
        assert_eq!(entry.kv_bytes(u64::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn a_directory_without_config_is_not_a_model() {
        let dir = TempDir::new("not-model");
        let error = ModelEntry::read("x", dir.path()).expect_err("no config");
        assert!(error.to_string().contains("without config.json"), "{error}");
    }
}
