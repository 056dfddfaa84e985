//! The models a backend serves, as its last probe listed them, and the
//! configured default.

use std::sync::RwLock;

use super::ProbeReport;

#[derive(Debug)]
pub(crate) struct ModelCatalog {
    configured: Option<String>,
    listed: RwLock<Vec<String>>,
}

impl ModelCatalog {
    pub(crate) fn new(configured: Option<String>) -> Self {
        Self {
            configured: configured.filter(|model| !model.trim().is_empty()),
            listed: RwLock::new(Vec::new()),
        }
    }

    pub(crate) fn configured(&self) -> Option<&str> {
        self.configured.as_deref()
    }

    /// Records a fresh listing and reports it with the default it implies.
    pub(crate) fn record(&self, models: Vec<String>) -> ProbeReport {
        *self
            .listed
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = models.clone();
        ProbeReport {
            default_model: self.default_model(),
            models,
        }
    }

    /// The configured model, else the first one the backend listed.
    pub(crate) fn default_model(&self) -> Option<String> {
        self.configured
            .clone()
            .or_else(|| self.listed().into_iter().next())
    }

    pub(crate) fn listed(&self) -> Vec<String> {
        self.listed
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}
