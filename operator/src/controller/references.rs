//! Referenced Secrets/ConfigMaps: which objects the connectors reference, the cache of their
//! data the render reads through, and the metadata-only watches that invalidate it.
//!
//! Invariants:
//! - Secrets are not cached wholesale: a metadata-only watch says *that* a Secret/ConfigMap
//!   changed (its data never arrives); if it is referenced by a connector, its cached data is
//!   dropped and the render loop is woken to re-read it with a GET;
//! - only referenced objects' data is ever held: each read drops what is no longer referenced;
//! - a (re)list of a watch drops every cached object of that kind, since anything may have
//!   changed while the watch was down; while the index is unreadable every change counts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent, watcher};
use kube::{Client, Resource};
use partnergate_crds::PartnerConnector;

use super::{Context, Error};
use crate::render::{self, ObjectKey, Objects, RefKind};

/// Data of one Secret/ConfigMap: key → bytes.
type ObjectData = BTreeMap<String, Vec<u8>>;

/// The referenced objects and the data read of them so far.
#[derive(Default)]
pub(super) struct References {
    /// Referenced objects (for the Secret/ConfigMap metadata watches).
    index: RwLock<HashSet<ObjectKey>>,
    /// Data of referenced objects; `None` = not found.
    cache: Mutex<HashMap<ObjectKey, Option<ObjectData>>>,
}

impl References {
    /// The data of every object `connectors` reference, GETting those not cached (16 at a
    /// time); records them as the referenced set and forgets the others.
    pub(super) async fn read(
        &self,
        client: &Client,
        connectors: &[Arc<PartnerConnector>],
    ) -> Result<Objects, Error> {
        let refs: HashSet<ObjectKey> = connectors
            .iter()
            .flat_map(|pc| render::references(pc))
            .collect();
        if let Ok(mut idx) = self.index.write() {
            idx.clone_from(&refs);
        }
        let missing: Vec<ObjectKey> = {
            let cache = self.cache.lock().map_err(|_| poisoned())?;
            refs.iter()
                .filter(|k| !cache.contains_key(k))
                .cloned()
                .collect()
        };
        let fetched: Vec<(ObjectKey, Option<ObjectData>)> = futures::stream::iter(missing)
            .map(|key| async move {
                let data = fetch_object(client, &key).await?;
                Ok::<_, kube::Error>((key, data))
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        let mut cache = self.cache.lock().map_err(|_| poisoned())?;
        cache.extend(fetched);
        cache.retain(|k, _| refs.contains(k));
        Ok(cache
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|d| (k.clone(), d.clone())))
            .collect())
    }

    /// Drops every cached object (the periodic full re-read).
    pub(super) fn clear(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
    }

    /// Drops `key`'s data if a connector references it; true when it does.
    fn changed(&self, key: &ObjectKey) -> bool {
        let referenced = self.index.read().map(|i| i.contains(key)).unwrap_or(true);
        if referenced && let Ok(mut c) = self.cache.lock() {
            c.remove(key);
        }
        referenced
    }

    /// Drops every cached object of `kind`.
    fn relisted(&self, kind: RefKind) {
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|k, _| k.kind != kind);
        }
    }
}

fn poisoned() -> Error {
    Error::Json(serde_json::Error::io(std::io::Error::other(
        "lock poisoned",
    )))
}

async fn fetch_object(client: &Client, key: &ObjectKey) -> Result<Option<ObjectData>, kube::Error> {
    match key.kind {
        RefKind::Secret => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &key.namespace);
            Ok(api.get_opt(&key.name).await?.map(|s| {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    data.entry(k).or_insert_with(|| v.into_bytes());
                }
                data
            }))
        }
        RefKind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &key.namespace);
            Ok(api.get_opt(&key.name).await?.map(|c| {
                let mut data: BTreeMap<String, Vec<u8>> = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in c.binary_data.unwrap_or_default() {
                    data.entry(k).or_insert(v.0);
                }
                data
            }))
        }
    }
}

/// Watches the metadata of one kind (in one scope) and wakes the render loop when a referenced
/// object changes.
pub(super) async fn ref_watch<K>(ctx: Arc<Context>, api: Api<PartialObjectMeta<K>>, kind: RefKind)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    // Api<PartialObjectMeta<K>> lists and watches metadata only: Secret data never arrives.
    let stream = watcher(api, watcher::Config::default().any_semantic()).default_backoff();
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(WatchEvent::Apply(m)) | Ok(WatchEvent::Delete(m)) => {
                let key = ObjectKey {
                    kind,
                    namespace: m.metadata.namespace.clone().unwrap_or_default(),
                    name: m.metadata.name.clone().unwrap_or_default(),
                };
                if ctx.references.changed(&key) {
                    tracing::debug!(object = %key, "referenced object changed");
                    ctx.render_notify.notify_one();
                }
            }
            Ok(WatchEvent::InitDone) => {
                // a (re)list: anything may have changed while the watch was down
                ctx.references.relisted(kind);
                ctx.render_notify.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "watch of referenced objects failed; retrying"),
        }
    }
}
