//! The models a backend holds itself (the embedded engine, the MLX
//! workers): its catalog, its default model and their residency, with the
//! lookups, listings, loads and unloads both backends answer the same way.

use futures_util::future::BoxFuture;

use super::{
    BackendError, ModelInfo, ResidencyStatus,
    catalog::{Catalog, ModelEntry},
    residency::{Lease, Residency, ResidencyError, ResidencyPolicy},
};

pub(crate) struct HeldModels<M: Send + Sync + 'static> {
    backend: &'static str,
    pub catalog: Catalog,
    pub default_model: String,
    pub residency: Residency<M>,
}

impl<M: Send + Sync + 'static> HeldModels<M> {
    pub fn new(
        backend: &'static str,
        catalog: Catalog,
        default_model: String,
        policy: ResidencyPolicy,
    ) -> Self {
        Self {
            backend,
            catalog,
            default_model,
            residency: Residency::new(policy),
        }
    }

    /// The models to load at start: the default one, then the pinned and
    /// preloaded ones this backend serves (the names may be another
    /// backend's).
    pub fn to_warm(&self, pinned: &[String], preload: &[String]) -> Vec<String> {
        let mut warm = vec![self.default_model.clone()];
        warm.extend(
            pinned
                .iter()
                .chain(preload)
                .filter(|model| self.catalog.get(model).is_ok())
                .cloned(),
        );
        warm
    }

    pub fn entry(&self, model: &str) -> Result<&ModelEntry, BackendError> {
        self.catalog
            .get(model)
            .map_err(|_| BackendError::ModelNotFound {
                backend: self.backend,
                model: model.to_owned(),
            })
    }

    /// The model a request names, else the default one.
    pub fn requested(&self, model: Option<&str>) -> String {
        model.unwrap_or(&self.default_model).to_owned()
    }

    /// `entry`'s model, loaded with `load` (estimated at `estimate` bytes)
    /// unless it is resident.
    pub async fn acquire<F>(
        &self,
        entry: &ModelEntry,
        estimate: u64,
        load: F,
    ) -> Result<Lease<M>, BackendError>
    where
        F: Fn() -> BoxFuture<'static, Result<M, String>>,
    {
        self.residency
            .acquire(&entry.name, estimate, load)
            .await
            .map_err(|error| self.error(error))
    }

    pub fn names(&self) -> Vec<String> {
        self.catalog
            .entries()
            .iter()
            .map(|entry| entry.name.clone())
            .collect()
    }

    /// Every model of the catalog, with its residence when loaded.
    pub fn infos(&self) -> Vec<ModelInfo> {
        let residents = self.residency.residents();
        self.catalog
            .entries()
            .iter()
            .map(|entry| {
                let residence = residents
                    .iter()
                    .find(|residence| residence.model == entry.name)
                    .cloned();
                ModelInfo::from_entry(entry, residence)
            })
            .collect()
    }

    pub fn unload(&self, model: &str) -> Result<(), BackendError> {
        self.entry(model)?;
        self.residency
            .unload(model)
            .map_err(|error| self.error(error))
    }

    pub fn status(&self) -> ResidencyStatus {
        ResidencyStatus::of(&self.residency)
    }

    fn error(&self, error: ResidencyError) -> BackendError {
        BackendError::Residency {
            backend: self.backend,
            error,
        }
    }
}
