//! The LoRA adapters a server runs beside its base model, by name: given at start (`--lora NAME=DIR`), loaded and
//! unloaded while it runs (vLLM's `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`), and picked per
//! request (OpenAI's `model`, TGI's `parameters.adapter_id`). A request holds its adapter for as long as it runs,
//! so unloading one does not disturb the requests already using it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use vicuna_model::native::LoraAdapter;
use vicuna_model::LlamaConfig;
use vicuna_weights::hub::{resolve_model, HubKind};
use vicuna_weights::NoProgress;

use crate::error::ApiError;
use crate::http::{blocking, json_response, read_json, SharedState};

/// An adapter as requests use it: its name (for metrics) and its weights.
#[derive(Clone, Debug)]
pub struct NamedLora {
    pub name: String,
    pub adapter: Arc<LoraAdapter>,
}

/// The adapters loaded now, checked against the base model's shapes.
pub struct Adapters {
    base: LlamaConfig,
    /// The base model's own name: requests naming it get no adapter.
    base_name: String,
    loaded: Mutex<BTreeMap<String, Loaded>>,
}

struct Loaded {
    adapter: Arc<LoraAdapter>,
    path: PathBuf,
    /// Unix time it was loaded (OpenAI's `created`).
    created: u64,
}

impl Adapters {
    pub fn new(base: LlamaConfig, base_name: &str) -> Adapters {
        Adapters { base, base_name: base_name.to_string(), loaded: Mutex::new(BTreeMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Loaded>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the adapter in `dir` and serves it as `name`. Refused: an empty name, the base model's name, a name
    /// already loaded, an adapter that does not fit the base (the message says why).
    pub fn load(&self, name: &str, dir: &Path, now: u64) -> Result<(), String> {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!("adapter name {name:?} must be non-empty, without spaces"));
        }
        if name == self.base_name {
            return Err(format!("adapter name {name:?} is the base model's own name; choose another"));
        }
        if self.lock().contains_key(name) {
            return Err(format!("an adapter named {name:?} is already loaded; unload it first"));
        }
        let adapter = LoraAdapter::load(dir, &self.base).map_err(|e| e.to_string())?;
        let loaded = Loaded { adapter: Arc::new(adapter), path: dir.to_path_buf(), created: now };
        // Checked again: another load of the name may have finished while this one read its files.
        let mut map = self.lock();
        if map.contains_key(name) {
            return Err(format!("an adapter named {name:?} is already loaded; unload it first"));
        }
        map.insert(name.to_string(), loaded);
        Ok(())
    }

    /// Stops serving `name`; requests running with it finish with it.
    pub fn unload(&self, name: &str) -> Result<(), String> {
        match self.lock().remove(name) {
            Some(_) => Ok(()),
            None => Err(format!("no adapter named {name:?} is loaded")),
        }
    }

    /// The adapter a request names: `None` for the base model (by its name, or when the request names none); an
    /// unknown name is an error while any adapter is loaded (without adapters, any name is the base model, as
    /// before adapters existed).
    pub fn resolve(&self, name: Option<&str>) -> Result<Option<NamedLora>, String> {
        let Some(name) = name.filter(|n| !n.is_empty() && *n != self.base_name) else { return Ok(None) };
        let map = self.lock();
        match map.get(name) {
            Some(loaded) => Ok(Some(NamedLora { name: name.to_string(), adapter: loaded.adapter.clone() })),
            None if map.is_empty() => Ok(None),
            None => Err(format!(
                "model {name:?} is neither the base model {:?} nor a loaded adapter ({}); GET /v1/models lists them",
                self.base_name,
                map.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// `/v1/models` entries of the adapters (vLLM's shape: `parent` is the base, `root` the adapter's folder).
    pub fn model_cards(&self) -> Vec<serde_json::Value> {
        self.lock()
            .iter()
            .map(|(name, loaded)| {
                json!({
                    "id": name,
                    "object": "model",
                    "created": loaded.created,
                    "owned_by": "vicuna",
                    "root": loaded.path.display().to_string(),
                    "parent": self.base_name,
                    "lora_rank": loaded.adapter.rank(),
                    "lora_target_modules": loaded.adapter.targets(),
                })
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: PathBuf,
}

#[derive(Deserialize)]
struct UnloadRequest {
    lora_name: String,
}

/// `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` (vLLM's): 200 once it serves; 400 if it cannot.
pub async fn load(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: LoadRequest = read_json(&state, body).await?;
    let (name, path) = (request.lora_name.clone(), request.lora_path.clone());
    let now = crate::http::unix_time();
    let task_state = state.clone();
    let loaded = blocking(move || {
        // A Hugging Face id (`ORG/NAME[@REV]`), as vLLM takes, comes from the Hugging Face cache (downloaded into
        // it when missing); a local path is used as it is.
        let dir = resolve_model(&path, HubKind::Model, &mut NoProgress)
            .map_err(|e| format!("lora_path {}: {e}", path.display()))?;
        task_state.adapters.load(&name, &dir, now).map(|()| dir)
    });
    let dir = loaded.await?.map_err(ApiError::bad_request)?;
    tracing::info!("loaded LoRA adapter {} from {}", request.lora_name, dir.display());
    Ok(json_response(StatusCode::OK, &json!({ "message": format!("adapter {} loaded", request.lora_name) })))
}

/// `POST /v1/unload_lora_adapter` `{"lora_name"}` (vLLM's): 200, or 404 for a name not loaded.
pub async fn unload(State(state): State<SharedState>, body: Body) -> Result<Response, ApiError> {
    let request: UnloadRequest = read_json(&state, body).await?;
    state.adapters.unload(&request.lora_name).map_err(ApiError::unknown_model)?;
    tracing::info!("unloaded LoRA adapter {}", request.lora_name);
    Ok(json_response(StatusCode::OK, &json!({ "message": format!("adapter {} unloaded", request.lora_name) })))
}
