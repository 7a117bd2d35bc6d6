//! Reloads that patch the last state: when a reload adds, removes or edits a few documents of
//! a large file, only those documents are parsed, validated and converted, and the last
//! accepted [`DesiredState`] is changed where they touch it. A file of 10,000 services with one
//! added costs a split and a hash per document instead of a rebuild of all of them.
//!
//! The full rebuild ([`ConfigFile::desired_state_cached`](super::file::ConfigFile)) stays the
//! definition of what a file means. A patch is only taken when it is sure to give the same
//! state; anything else (an error of any kind, a change to the first document, a service whose
//! cluster IP is allocated rather than written, a large change) declines, and the caller runs
//! the full path, which reports errors with their document numbers. A unit test compares both
//! over random edit sequences.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::file::{parse_document, split_documents, Doc, Skipped};
use super::Settings;
use crate::model::{convert, DesiredState, Protocol, ServicePort, ServicePortName};

/// `(namespace, name)` of a service.
type Key = (String, String);

/// The hash a document's text is cached and indexed by.
pub(super) fn doc_hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// What one accepted document contributes.
#[derive(Debug, Clone)]
pub(super) enum Entry {
    /// Empty, or the proxy configuration (always the first document).
    Inert,
    /// A Service: its label, key, ports (`None`: skipped) and whether its cluster IP was
    /// allocated (which makes every other service's allocation depend on it).
    Service {
        label: String,
        key: Key,
        ports: Option<Vec<Arc<ServicePort>>>,
        allocated: bool,
    },
    /// A v1 Endpoints object.
    Endpoints {
        label: String,
        object: Arc<Endpoints>,
    },
    /// An EndpointSlice and the service it belongs to.
    Slice {
        label: String,
        service: Key,
        object: Arc<EndpointSlice>,
    },
}

/// The documents that feed one service's endpoints, by document hash.
#[derive(Debug, Default, Clone)]
struct Feeds {
    endpoints: Vec<u64>,
    slices: Vec<u64>,
}

/// The last accepted file, indexed by document.
#[derive(Debug)]
pub(super) struct Index {
    /// Hash of the first document: a change to it (the proxy configuration) takes the full path.
    first: u64,
    docs: HashMap<u64, Entry>,
    state: DesiredState,
    /// Cluster-IP portals in use, for the conflict check.
    portals: HashMap<(IpAddr, u16, Protocol), ServicePortName>,
    /// Ports of each proxied service.
    services: HashMap<Key, Vec<Arc<ServicePort>>>,
    feeds: HashMap<Key, Feeds>,
    /// Labels of every object, for the duplicate check.
    labels: HashSet<String>,
    /// Services whose cluster IP was allocated.
    allocated: usize,
}

/// A patch may change this many documents, or a quarter of the file if that is more. Beyond
/// it the full path is about as fast, and a patch that declines late would cost both.
const MIN_PATCH: usize = 8;

impl Index {
    /// Indexes an accepted file: `first` is the hash of its first document, `entries` what
    /// each document hash holds, `state` what the full path built from them.
    pub(super) fn build(first: u64, entries: HashMap<u64, Entry>, state: &DesiredState) -> Self {
        let mut index = Index {
            first,
            docs: HashMap::with_capacity(entries.len()),
            state: state.clone(),
            portals: HashMap::with_capacity(state.services.len()),
            services: HashMap::new(),
            feeds: HashMap::new(),
            labels: HashSet::with_capacity(entries.len()),
            allocated: 0,
        };
        for (_, port) in state.services.iter() {
            index.portals.insert(
                (port.cluster_ip, port.port, port.protocol),
                port.name.clone(),
            );
        }
        for (hash, entry) in entries {
            index.note(hash, &entry);
            index.docs.insert(hash, entry);
        }
        index
    }

    /// Records the indexes of an entry (not the state).
    fn note(&mut self, hash: u64, entry: &Entry) {
        match entry {
            Entry::Inert => {}
            Entry::Service {
                label,
                key,
                ports,
                allocated,
            } => {
                self.labels.insert(label.clone());
                self.allocated += usize::from(*allocated);
                if let Some(p) = ports {
                    self.services.insert(key.clone(), p.clone());
                }
            }
            Entry::Endpoints { label, object } => {
                self.labels.insert(label.clone());
                let key = convert::namespaced_name(&object.metadata);
                self.feeds.entry(key).or_default().endpoints.push(hash);
            }
            Entry::Slice { label, service, .. } => {
                self.labels.insert(label.clone());
                self.feeds
                    .entry(service.clone())
                    .or_default()
                    .slices
                    .push(hash);
            }
        }
    }

    /// Applies the documents of `text` that differ from the indexed file. `None`: not patched
    /// (see the module text); the index is then spent and `self` must be dropped.
    /// `parsed` is the parse cache (document hash → parsed document and label).
    pub(super) fn patch(
        &mut self,
        origin: &str,
        text: &str,
        settings: &Settings,
        parsed: &mut HashMap<u64, (Doc, String)>,
    ) -> Option<(DesiredState, Vec<Skipped>)> {
        let segments = split_documents(text);
        let mut position: HashMap<u64, usize> = HashMap::with_capacity(segments.len());
        let mut added: Vec<(usize, u64, &str)> = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            let blank = segment
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
            if blank && i > 0 {
                continue; // an empty document: nothing to index
            }
            let hash = doc_hash(segment);
            if position.insert(hash, i).is_some() {
                return None; // the same text twice: a duplicate, reported by the full path
            }
            if !self.docs.contains_key(&hash) {
                added.push((i, hash, segment));
            }
        }
        if position.get(&self.first) != Some(&0) {
            return None;
        }
        let removed: Vec<u64> = self
            .docs
            .keys()
            .filter(|h| !position.contains_key(h))
            .copied()
            .collect();
        if removed.len() + added.len() > (segments.len() / 4).max(MIN_PATCH) {
            return None;
        }
        let mut dirty: HashSet<Key> = HashSet::new();
        for hash in &removed {
            let entry = self.docs.remove(hash)?;
            self.forget(*hash, entry, &mut dirty)?;
            parsed.remove(hash);
        }
        let mut skipped = Vec::new();
        for (i, hash, segment) in added {
            let (doc, label) = match parsed.get(&hash) {
                Some(hit) => hit.clone(),
                None => parse_document(origin, i + 1, segment).ok()?,
            };
            let entry = self.add(&doc, label.clone(), settings, &mut skipped, &mut dirty)?;
            self.note(hash, &entry);
            self.docs.insert(hash, entry);
            parsed.insert(hash, (doc, label));
        }
        for key in dirty {
            self.refresh_endpoints(&key, &position)?;
        }
        Some((self.state.clone(), skipped))
    }

    /// Takes out what a removed document contributed.
    fn forget(&mut self, hash: u64, entry: Entry, dirty: &mut HashSet<Key>) -> Option<()> {
        match entry {
            Entry::Inert => {}
            Entry::Service {
                label,
                key,
                ports,
                allocated,
            } => {
                if ports.is_some() && (allocated || self.allocated > 0) {
                    return None; // the allocated addresses of other services may move
                }
                self.labels.remove(&label);
                for p in ports.iter().flatten() {
                    self.portals.remove(&(p.cluster_ip, p.port, p.protocol));
                    self.state.services.remove(&p.name);
                    self.state.endpoints.remove(&p.name);
                }
                self.services.remove(&key);
            }
            Entry::Endpoints { label, object } => {
                self.labels.remove(&label);
                let key = convert::namespaced_name(&object.metadata);
                if let Some(f) = self.feeds.get_mut(&key) {
                    f.endpoints.retain(|h| *h != hash);
                }
                dirty.insert(key);
            }
            Entry::Slice { label, service, .. } => {
                self.labels.remove(&label);
                if let Some(f) = self.feeds.get_mut(&service) {
                    f.slices.retain(|h| *h != hash);
                }
                dirty.insert(service);
            }
        }
        Some(())
    }

    /// Validates and applies an added document; its indexes are recorded by the caller.
    fn add(
        &mut self,
        doc: &Doc,
        label: String,
        settings: &Settings,
        skipped: &mut Vec<Skipped>,
        dirty: &mut HashSet<Key>,
    ) -> Option<Entry> {
        if !matches!(doc, Doc::Empty) && self.labels.contains(&label) {
            return None; // defined twice
        }
        Some(match doc {
            Doc::Empty => Entry::Inert,
            Doc::Config(_) => return None, // only allowed first, and the first is unchanged
            Doc::Service(svc) => {
                let key = convert::namespaced_name(&svc.metadata);
                if let Some(skip) = convert::skip_service(svc, true) {
                    skipped.push(Skipped {
                        what: format!("Service {}/{}", key.0, key.1),
                        reason: skip.reason().into(),
                    });
                    return Some(Entry::Service {
                        label,
                        key,
                        ports: None,
                        allocated: false,
                    });
                }
                if self.allocated > 0 {
                    return None; // an explicit address may take one that was allocated
                }
                let ip = convert::explicit_cluster_ip(svc).ok()??;
                if !settings.service_cidr.contains(&ip) {
                    return None;
                }
                let (ports, skipped_ports) = convert::service_ports(svc, ip).ok()?;
                let ports: Vec<Arc<ServicePort>> = ports.into_iter().map(Arc::new).collect();
                let names: HashSet<&str> = ports.iter().map(|p| p.name.port.as_str()).collect();
                if names.len() != ports.len()
                    || ports.iter().any(|p| {
                        self.portals
                            .contains_key(&(p.cluster_ip, p.port, p.protocol))
                    })
                    || self.services.contains_key(&key)
                {
                    return None; // a conflict: the full path names it
                }
                // Ports of one service on the same address, port and protocol conflict too.
                let own: HashSet<(IpAddr, u16, Protocol)> = ports
                    .iter()
                    .map(|p| (p.cluster_ip, p.port, p.protocol))
                    .collect();
                if own.len() != ports.len() {
                    return None;
                }
                for p in &ports {
                    self.portals
                        .insert((p.cluster_ip, p.port, p.protocol), p.name.clone());
                    self.state.services.insert(p.name.clone(), p.clone());
                }
                skipped.extend(skipped_ports.into_iter().map(|s| Skipped {
                    what: s.name.to_string(),
                    reason: s.reason,
                }));
                dirty.insert(key.clone());
                Entry::Service {
                    label,
                    key,
                    ports: Some(ports),
                    allocated: false,
                }
            }
            Doc::Endpoints(ep) => {
                dirty.insert(convert::namespaced_name(&ep.metadata));
                Entry::Endpoints {
                    label,
                    object: ep.clone(),
                }
            }
            Doc::Slice(slice) => {
                let service = convert::slice_service(slice)?;
                dirty.insert(service.clone());
                Entry::Slice {
                    label,
                    service,
                    object: slice.clone(),
                }
            }
        })
    }

    /// Recomputes the endpoints of one service from its documents, as the full path does:
    /// its slices (merged in document order) if it has any, else its v1 Endpoints.
    fn refresh_endpoints(&mut self, key: &Key, position: &HashMap<u64, usize>) -> Option<()> {
        let feeds = self.feeds.get(key).cloned().unwrap_or_default();
        let by_port = if !feeds.slices.is_empty() {
            let mut slices: Vec<(usize, &EndpointSlice)> = Vec::new();
            for h in &feeds.slices {
                let Some(Entry::Slice { object, .. }) = self.docs.get(h) else {
                    return None;
                };
                slices.push((position.get(h).copied()?, object));
            }
            slices.sort_by_key(|(p, _)| *p);
            convert::merge_slices(slices.into_iter().map(|(_, s)| s)).ok()?
        } else if let Some(h) = feeds.endpoints.first() {
            let Some(Entry::Endpoints { object, .. }) = self.docs.get(h) else {
                return None;
            };
            convert::endpoints_by_port(object).ok()?
        } else {
            Default::default()
        };
        if feeds.slices.is_empty() && feeds.endpoints.is_empty() {
            self.feeds.remove(key);
        }
        for p in self.services.get(key).into_iter().flatten() {
            self.state.endpoints.remove(&p.name);
        }
        for (port, eps) in by_port {
            let name = ServicePortName::new(key.0.clone(), key.1.clone(), port);
            if self.state.services.contains_key(&name) {
                self.state.endpoints.insert(name, Arc::new(eps));
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::file::{ConfigFile, ParseCache};

    const HEAD: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: userspace\nserviceClusterIPRange: 10.96.0.0/16\n";

    /// One random document: services (explicit, allocated, headless, conflicting), their
    /// Endpoints and EndpointSlices (sometimes invalid), over a small name space so that
    /// duplicates and conflicts happen.
    fn random_doc(rng: &mut StdRng) -> String {
        let n = rng.random_range(0..24);
        let port = 80 + rng.random_range(0..3u16);
        let ip = format!("10.96.0.{}", rng.random_range(1..30));
        let addr = |rng: &mut StdRng| format!("10.1.0.{}", rng.random_range(1..6));
        match rng.random_range(0..100) {
            0..40 => format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: {port}}}, {{name: q, port: 9{port}, protocol: UDP}}]}}\n"),
            40..43 => format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: ns}}\nspec: {{ports: [{{name: p, port: {port}}}]}}\n"),
            43..46 => format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: ns}}\nspec: {{clusterIP: None, ports: [{{name: p, port: {port}}}]}}\n"),
            46..48 => format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: ns}}\nspec: {{clusterIP: 10.200.0.1, ports: [{{name: p, port: {port}}}]}}\n"),
            48..74 => {
                let (a, b) = (addr(rng), addr(rng));
                format!("apiVersion: v1\nkind: Endpoints\nmetadata: {{name: s{n}, namespace: ns}}\nsubsets: [{{addresses: [{{ip: {a}}}, {{ip: {b}}}], ports: [{{name: p, port: 8080}}, {{name: q, port: 53, protocol: UDP}}]}}]\n")
            }
            74..96 => {
                let k = rng.random_range(0..3);
                let a = addr(rng);
                let ready = rng.random_bool(0.7);
                format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{n}-{k}, namespace: ns, labels: {{kubernetes.io/service-name: s{n}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8081}}]\nendpoints: [{{addresses: [{a}], conditions: {{ready: {ready}}}}}]\n")
            }
            96..98 => "# an empty document\n".to_string(),
            _ => format!("apiVersion: v1\nkind: Endpoints\nmetadata: {{name: s{n}, namespace: ns}}\nsubsets: [{{addresses: [{{ip: not-an-ip}}], ports: [{{name: p, port: 8080}}]}}]\n"),
        }
    }

    fn text(docs: &[String]) -> String {
        let mut t = HEAD.to_string();
        for d in docs {
            t.push_str("---\n");
            t.push_str(d);
        }
        t
    }

    #[test]
    fn patched_reloads_equal_full_rebuilds_over_random_edits() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut docs: Vec<String> = Vec::new();
        while docs.len() < 40 {
            docs.push(random_doc(&mut rng));
            let valid =
                ConfigFile::parse("f", &text(&docs)).and_then(|f| f.desired_state(&f.settings()?));
            if valid.is_err() {
                docs.pop();
            }
        }
        let full = |t: &str, cache: &mut ParseCache| {
            ConfigFile::parse_cached("f", t, cache).and_then(|f| {
                let settings = f.settings()?;
                f.desired_state_cached(&settings, cache)
            })
        };
        let mut cache = ParseCache::default();
        full(&text(&docs), &mut cache).expect("the base file is valid");
        let settings = ConfigFile::parse("f", HEAD).unwrap().settings().unwrap();
        let (mut patched, mut accepted, mut refused) = (0, 0, 0);
        for _ in 0..600 {
            let mut next = docs.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..next.len());
                match rng.random_range(0..3) {
                    0 => next.insert(i, random_doc(&mut rng)),
                    1 if next.len() > 10 => {
                        next.remove(i);
                    }
                    _ => next[i] = random_doc(&mut rng),
                }
            }
            let t = text(&next);
            let expected = ConfigFile::parse("f", &t)
                .and_then(|f| f.desired_state(&f.settings()?))
                .map(|(state, _)| state);
            match cache.patch("f", &t, &settings) {
                Some((state, _)) => {
                    patched += 1;
                    assert_eq!(Some(&state), expected.as_ref().ok(), "patched:\n{t}");
                }
                None => {
                    let got = full(&t, &mut cache).map(|(state, _)| state);
                    assert_eq!(got.is_ok(), expected.is_ok(), "full:\n{t}");
                }
            }
            if expected.is_ok() {
                accepted += 1;
                docs = next;
            } else {
                refused += 1; // a refused reload keeps the last good file
                full(&text(&docs), &mut cache).unwrap();
            }
        }
        // The test means something only if both kinds of edit happen, and most accepted
        // ones are patched.
        assert!(refused > 50, "{refused} refused");
        assert!(patched * 2 > accepted, "{patched} of {accepted} patched");
    }
}
