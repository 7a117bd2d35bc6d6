//! The configuration file: a multi-document YAML stream whose first document is the
//! `KubeProxyConfiguration` and whose other documents are standard Kubernetes objects
//! (`v1 Service`, `v1 Endpoints`, `discovery.k8s.io/v1 EndpointSlice`).
//!
//! Parsing and building the [`DesiredState`] are pure functions of the text, so a reload can be
//! fully checked before anything running is touched.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use super::patch;
use super::{Error, KubeProxyConfiguration, Result, Settings, API_VERSION, KIND};
use crate::model::{self, cluster_ip, convert, DesiredState, ServicePortName};

/// A parsed configuration file.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    /// Where it came from (a path, or `<embedded default>`), for error texts.
    pub origin: String,
    /// The proxy configuration (defaults if the file has none).
    pub proxy: KubeProxyConfiguration,
    /// Document number of the proxy configuration (0 if absent).
    pub proxy_document: usize,
    /// Services with their document numbers. (Shared with the parse cache: a reload that
    /// finds a document unchanged reuses the object, and its conversion.)
    pub services: Vec<(usize, Arc<Service>)>,
    /// Endpoints with their document numbers.
    pub endpoints: Vec<(usize, Arc<Endpoints>)>,
    /// EndpointSlices with their document numbers.
    pub slices: Vec<(usize, Arc<EndpointSlice>)>,
}

/// Something in the file that is deliberately not proxied, for a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `Service ns/name` or `ns/name:port`.
    pub what: String,
    /// Why.
    pub reason: String,
}

fn typed<T: for<'de> Deserialize<'de>>(
    origin: &str,
    document: usize,
    object: &str,
    value: serde_yaml::Value,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        Error::Field {
            origin: origin.into(),
            document,
            object: object.into(),
            field: if field == "." {
                "(document)".into()
            } else {
                field
            },
            message: e.into_inner().to_string(),
        }
    })
}

/// One parsed document, kept between reloads.
#[derive(Clone, Debug)]
pub(super) enum Doc {
    Empty,
    Config(Box<KubeProxyConfiguration>),
    Service(Arc<Service>),
    Endpoints(Arc<Endpoints>),
    Slice(Arc<EndpointSlice>),
}

/// Parsed documents by the hash of their text, so a reload parses only what changed, and the
/// conversions of their objects, so it converts only what changed.
#[derive(Debug, Default)]
pub struct ParseCache {
    docs: HashMap<u64, (Doc, String)>,
    convert: ConvertCache,
    /// The hash of each document of the last parse, in order.
    order: Vec<u64>,
    /// The last accepted file by document, for reloads that patch it (see [`patch`]).
    index: Option<patch::Index>,
}

impl ParseCache {
    /// The state of `text` by patching the last accepted one, when only a few documents
    /// changed and the patch is sure to equal a full rebuild; `None` otherwise (the caller
    /// then parses `text` in full, which reports any error). `settings` are those the last
    /// state was built with.
    pub fn patch(
        &mut self,
        origin: &str,
        text: &str,
        settings: &Settings,
    ) -> Option<(DesiredState, Vec<Skipped>)> {
        let mut index = self.index.take()?;
        let out = index.patch(origin, text, settings, &mut self.docs)?;
        self.index = Some(index);
        Some(out)
    }
}

/// Splits YAML text at document markers. A line that is `---` (or starts with `--- `) always
/// starts a new document in YAML, even inside a block scalar, so this split is exact. Text
/// before the first marker is a document only if it has content.
pub(super) fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let (mut start, mut pos) = (0, 0);
    for line in text.split_inclusive('\n') {
        let l = line.trim_end_matches(['\n', '\r']);
        if l == "---" || l.starts_with("--- ") {
            docs.push(&text[start..pos]);
            start = pos + 3;
        }
        pos += line.len();
    }
    docs.push(&text[start..]);
    let has_content = |d: &str| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    };
    if docs.len() > 1 && !has_content(docs[0]) {
        docs.remove(0);
    }
    docs
}

/// Below this many documents to parse, threads cost more than they save.
const PARALLEL_DOCUMENTS: usize = 512;

/// Parses the documents of `segments` at the indices `misses`, in that order, on every CPU:
/// YAML parsing is most of a start with 10,000 services (0.25 s of 0.35 s on one core here),
/// and each document parses on its own.
fn parse_documents(
    origin: &str,
    segments: &[&str],
    misses: &[usize],
) -> Vec<Result<(Doc, String)>> {
    let one = |&i: &usize| parse_document(origin, i + 1, segments[i]);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if threads == 1 || misses.len() < PARALLEL_DOCUMENTS {
        return misses.iter().map(one).collect();
    }
    let chunk = misses.len().div_ceil(threads);
    std::thread::scope(|s| {
        let mut parts = misses.chunks(chunk);
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|part| s.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
            .collect();
        let mut out: Vec<_> = first.iter().map(one).collect();
        for h in others {
            out.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        out
    })
}

/// Parses one document into its typed object, with the label duplicates are reported by.
pub(super) fn parse_document(origin: &str, document: usize, text: &str) -> Result<(Doc, String)> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| Error::Document {
        origin: origin.into(),
        document,
        message: format!("not valid YAML: {e}"),
    })?;
    if value.is_null() {
        return Ok((Doc::Empty, String::new())); // an empty document, e.g. a trailing `---`
    }
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let label = if kind == KIND {
        KIND.to_string()
    } else {
        format!("{kind} {}", meta_name(&value))
    };
    let doc = match (api_version.as_str(), kind.as_str()) {
        (API_VERSION, KIND) => Doc::Config(Box::new(typed(origin, document, KIND, value)?)),
        ("v1", "Service") => Doc::Service(Arc::new(typed(origin, document, &label, value)?)),
        ("v1", "Endpoints") => Doc::Endpoints(Arc::new(typed(origin, document, &label, value)?)),
        ("discovery.k8s.io/v1", "EndpointSlice") => Doc::Slice(Arc::new(typed(origin, document, &label, value)?)),
        _ => {
            return Err(Error::Document {
                origin: origin.into(),
                document,
                message: format!(
                    "unsupported object apiVersion={api_version:?} kind={kind:?} (expected {API_VERSION} {KIND}, v1 Service, v1 Endpoints or discovery.k8s.io/v1 EndpointSlice)"
                ),
            })
        }
    };
    Ok((doc, label))
}

fn meta_name(value: &serde_yaml::Value) -> String {
    let meta = value.get("metadata");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    format!("{ns}/{name}")
}

impl ConfigFile {
    /// Parses every document of `text`. `origin` names the file in errors.
    ///
    /// # Errors
    /// YAML syntax errors, unknown kinds, unknown or invalid fields, duplicate objects: each
    /// naming the file, the document and the field.
    pub fn parse(origin: &str, text: &str) -> Result<Self> {
        Self::parse_cached(origin, text, &mut ParseCache::default())
    }

    /// Like [`parse`](Self::parse), but documents whose text is unchanged since the last call
    /// with the same `cache` are not parsed again: a reload of a file with 10,000 services
    /// where one changed parses one document.
    ///
    /// # Errors
    /// As [`parse`](Self::parse).
    pub fn parse_cached(origin: &str, text: &str, cache: &mut ParseCache) -> Result<Self> {
        let mut out = ConfigFile {
            origin: origin.into(),
            proxy: KubeProxyConfiguration::default(),
            proxy_document: 0,
            services: Vec::new(),
            endpoints: Vec::new(),
            slices: Vec::new(),
        };
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut next = HashMap::new();
        cache.index = None;
        cache.order.clear();
        let segments = split_documents(text);
        let mut hits = Vec::with_capacity(segments.len());
        let mut misses = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            let key = patch::doc_hash(segment);
            cache.order.push(key);
            let hit = cache.docs.remove(&key);
            if hit.is_none() {
                misses.push(i);
            }
            hits.push((key, hit));
        }
        let mut parsed = parse_documents(origin, &segments, &misses).into_iter();
        for (i, (key, hit)) in hits.into_iter().enumerate() {
            let document = i + 1;
            let (doc, label) = match hit {
                Some(hit) => hit,
                // In document order, so the first bad document is the one reported.
                None => parsed.next().expect("one result per miss")?,
            };
            next.insert(key, (doc.clone(), label.clone()));
            if !matches!(doc, Doc::Empty | Doc::Config(_)) {
                if let Some(first) = seen.insert(label.clone(), document) {
                    return Err(Error::Document {
                        origin: origin.into(),
                        document,
                        message: format!("{label} is defined twice (first in document {first})"),
                    });
                }
            }
            match doc {
                Doc::Empty => {}
                Doc::Config(c) => {
                    if document != 1 {
                        return Err(Error::Document {
                            origin: origin.into(),
                            document,
                            message: format!("{KIND} must be the first document"),
                        });
                    }
                    out.proxy = *c;
                    out.proxy_document = document;
                }
                Doc::Service(o) => out.services.push((document, o)),
                Doc::Endpoints(o) => out.endpoints.push((document, o)),
                Doc::Slice(o) => out.slices.push((document, o)),
            }
        }
        cache.docs = next;
        Ok(out)
    }

    /// Validates the proxy configuration (after `apply`ing flags to `self.proxy`).
    ///
    /// # Errors
    /// The first invalid field.
    pub fn settings(&self) -> Result<Settings> {
        self.proxy.validate(&self.origin, self.proxy_document)
    }

    /// Builds the desired state the file describes: cluster IPs allocated for services that name
    /// none, endpoints merged, skipped objects reported.
    ///
    /// # Errors
    /// Invalid fields, a cluster IP outside the service range, or two service ports on the same
    /// `ClusterIP:port/protocol`, each naming the document and the object.
    pub fn desired_state(&self, settings: &Settings) -> Result<(DesiredState, Vec<Skipped>)> {
        self.desired_state_cached(settings, &mut ParseCache::default())
    }

    /// Like [`desired_state`](Self::desired_state), reusing the conversions of objects that
    /// are unchanged since the last call with the same `cache` (which parsed this file, and
    /// hands back the same object for an unchanged document).
    ///
    /// # Errors
    /// As [`desired_state`](Self::desired_state).
    pub fn desired_state_cached(
        &self,
        settings: &Settings,
        parse_cache: &mut ParseCache,
    ) -> Result<(DesiredState, Vec<Skipped>)> {
        let cache = &mut parse_cache.convert;
        let mut next = ConvertCache::default();
        let field_err = |document: usize, e: convert::Error| Error::Field {
            origin: self.origin.clone(),
            document,
            object: e.object,
            field: e.field,
            message: e.message,
        };
        let mut skipped = Vec::new();
        let mut wanted: Vec<(usize, &Arc<Service>, String)> = Vec::new();
        let mut explicit: BTreeMap<String, Option<IpAddr>> = BTreeMap::new();
        for (document, svc) in &self.services {
            let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
            let name = svc.metadata.name.as_deref().unwrap_or_default();
            let key = format!("{ns}/{name}");
            if let Some(skip) = convert::skip_service(svc, true) {
                skipped.push(Skipped {
                    what: format!("Service {key}"),
                    reason: skip.reason().into(),
                });
                continue;
            }
            let ip = convert::explicit_cluster_ip(svc).map_err(|e| field_err(*document, e))?;
            explicit.insert(key.clone(), ip);
            wanted.push((*document, svc, key));
        }
        // The document of a service, for an allocation error (rare: looked up only then).
        let doc_of = |service: &str| {
            wanted
                .iter()
                .find(|(_, _, k)| k == service)
                .map_or(0, |(d, _, _)| *d)
        };
        let ips = cluster_ip::assign(&settings.service_cidr, &explicit).map_err(|e| {
            let (service, field) = match &e {
                cluster_ip::Error::OutsideRange { service, .. }
                | cluster_ip::Error::Exhausted { service, .. } => {
                    (service.clone(), "spec.clusterIP")
                }
            };
            let message = match &e {
                cluster_ip::Error::OutsideRange { ip, range, .. } => {
                    format!("{ip} is outside the service range {range} (serviceClusterIPRange)")
                }
                cluster_ip::Error::Exhausted { range, .. } => {
                    format!("no free address left in {range}")
                }
            };
            Error::Field {
                origin: self.origin.clone(),
                document: doc_of(&service),
                object: format!("Service {service}"),
                field: field.into(),
                message,
            }
        })?;

        let mut state = DesiredState::default();
        let mut portal_owner: HashMap<(IpAddr, u16, model::Protocol), ServicePortName> =
            HashMap::new();
        for (document, svc, key) in &wanted {
            let document = *document;
            let ip = ips[key];
            let ptr = Arc::as_ptr(svc) as usize;
            let (ports, skipped_ports) = match cache.services.remove(&ptr) {
                Some(hit) if hit.1 == ip => (hit.2.clone(), hit.3.clone()),
                _ => {
                    let (p, sk) =
                        convert::service_ports(svc, ip).map_err(|e| field_err(document, e))?;
                    (p.into_iter().map(Arc::new).collect::<Vec<_>>(), sk)
                }
            };
            next.services.insert(
                ptr,
                (Arc::clone(svc), ip, ports.clone(), skipped_ports.clone()),
            );
            skipped.extend(skipped_ports.into_iter().map(|s| Skipped {
                what: s.name.to_string(),
                reason: s.reason,
            }));
            for (i, port) in ports.into_iter().enumerate() {
                if let Some(other) = portal_owner.insert(
                    (port.cluster_ip, port.port, port.protocol),
                    port.name.clone(),
                ) {
                    return Err(Error::Field {
                        origin: self.origin.clone(),
                        document,
                        object: format!("Service {key}"),
                        field: format!("spec.ports[{i}].port"),
                        message: format!(
                            "{}:{}/{} is already used by {other}",
                            port.cluster_ip, port.port, port.protocol
                        ),
                    });
                }
                if state.services.contains_key(&port.name) {
                    return Err(Error::Field {
                        origin: self.origin.clone(),
                        document,
                        object: format!("Service {key}"),
                        field: format!("spec.ports[{i}].name"),
                        message: format!("port name {:?} is used twice", port.name.port),
                    });
                }
                state.services.insert(port.name.clone(), port);
            }
        }

        // Endpoints: slices win over a v1 Endpoints object for the same service, as in a
        // cluster that has both (the EndpointSlice mirroring controller keeps them in step).
        let mut slices_by_svc: BTreeMap<(String, String), Vec<(usize, &EndpointSlice)>> =
            BTreeMap::new();
        for (document, slice) in &self.slices {
            let Some(key) = convert::slice_service(slice) else {
                let (ns, n) = convert::namespaced_name(&slice.metadata);
                return Err(Error::Field {
                    origin: self.origin.clone(),
                    document: *document,
                    object: format!("EndpointSlice {ns}/{n}"),
                    field: format!("metadata.labels[{}]", convert::LABEL_SERVICE_NAME),
                    message: "missing: it names the service this slice belongs to".into(),
                });
            };
            slices_by_svc
                .entry(key)
                .or_default()
                .push((*document, slice));
        }
        let mut by_service: BTreeMap<(String, String), Vec<(ServicePortName, EndpointList)>> =
            BTreeMap::new();
        let named = |ns: &str, name: &str, ports: BTreeMap<String, Vec<model::Endpoint>>| {
            ports
                .into_iter()
                .map(|(port, eps)| (ServicePortName::new(ns, name, port), Arc::new(eps)))
                .collect::<Vec<_>>()
        };
        for ((ns, name), group) in &slices_by_svc {
            let first_doc = group[0].0;
            let merged = convert::merge_slices(group.iter().map(|(_, s)| &**s))
                .map_err(|e| field_err(first_doc, e))?;
            by_service.insert((ns.clone(), name.clone()), named(ns, name, merged));
        }
        for (document, ep) in &self.endpoints {
            let key = convert::namespaced_name(&ep.metadata);
            if by_service.contains_key(&key) {
                continue;
            }
            let ptr = Arc::as_ptr(ep) as usize;
            let list = match cache.endpoints.remove(&ptr) {
                Some((_, list)) => list,
                None => {
                    let by_port =
                        convert::endpoints_by_port(ep).map_err(|e| field_err(*document, e))?;
                    named(&key.0, &key.1, by_port)
                }
            };
            next.endpoints.insert(ptr, (ep.clone(), list.clone()));
            by_service.insert(key, list);
        }
        for (_, ports) in by_service {
            for (spn, eps) in ports {
                if state.services.contains_key(&spn) {
                    state.endpoints.insert(spn, eps);
                }
            }
        }
        *cache = next;
        parse_cache.index = index_of(parse_cache, &state);
        Ok((state, skipped))
    }
}

/// Indexes the file the cache last parsed and converted into `state`, by document, for
/// reloads that patch it. `None` when the cache did not parse it (no document order).
fn index_of(cache: &ParseCache, state: &DesiredState) -> Option<patch::Index> {
    let mut entries = HashMap::with_capacity(cache.order.len());
    for (i, hash) in cache.order.iter().enumerate() {
        let (doc, label) = cache.docs.get(hash)?;
        let entry = match doc {
            Doc::Empty if i > 0 => continue, // not indexed; see `Index::patch`
            Doc::Empty | Doc::Config(_) => patch::Entry::Inert,
            Doc::Service(svc) => {
                let converted = cache.convert.services.get(&(Arc::as_ptr(svc) as usize));
                patch::Entry::Service {
                    label: label.clone(),
                    key: convert::namespaced_name(&svc.metadata),
                    ports: converted.map(|c| c.2.clone()),
                    allocated: converted.is_some()
                        && !matches!(convert::explicit_cluster_ip(svc), Ok(Some(_))),
                }
            }
            Doc::Endpoints(ep) => patch::Entry::Endpoints {
                label: label.clone(),
                object: ep.clone(),
            },
            Doc::Slice(slice) => patch::Entry::Slice {
                label: label.clone(),
                service: convert::slice_service(slice)?,
                object: slice.clone(),
            },
        };
        entries.insert(*hash, entry);
    }
    Some(patch::Index::build(*cache.order.first()?, entries, state))
}

type EndpointList = Arc<Vec<model::Endpoint>>;
/// A Service, the cluster IP it was converted with, its ports and its skipped ports.
type ConvertedService = (
    Arc<Service>,
    IpAddr,
    Vec<Arc<model::ServicePort>>,
    Vec<convert::SkippedPort>,
);
/// An Endpoints object and its endpoints by service port.
type ConvertedEndpoints = (Arc<Endpoints>, Vec<(ServicePortName, EndpointList)>);

/// Conversions of the objects of the last reload, keyed by object identity: an unchanged
/// document keeps its object (see [`ParseCache`]), so its conversion is reused instead of
/// redone. Each entry holds its object, so an address is never reused while it is a key.
#[derive(Debug, Default)]
struct ConvertCache {
    services: HashMap<usize, ConvertedService>,
    endpoints: HashMap<usize, ConvertedEndpoints>,
}

/// Reads and parses a file.
///
/// # Errors
/// The file cannot be read, or does not parse.
pub fn load(path: &std::path::Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    ConfigFile::parse(&path.display().to_string(), &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: userspace\n";

    fn state(text: &str) -> Result<DesiredState> {
        let f = ConfigFile::parse("test.yaml", text)?;
        let s = f.settings()?;
        f.desired_state(&s).map(|(d, _)| d)
    }

    /// Enough documents to be parsed on several threads: the result is in document order, and
    /// of two bad documents the first is the one reported, as when parsed one by one.
    #[test]
    fn documents_parsed_in_parallel_keep_their_order_and_first_error() {
        let svc = |i: usize| {
            format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{ports: [{{port: 80}}]}}\n")
        };
        let text: String = std::iter::once(HEAD.to_string())
            .chain((0..2 * PARALLEL_DOCUMENTS).map(svc))
            .collect();
        let f = ConfigFile::parse("t.yaml", &text).unwrap();
        assert_eq!(f.services.len(), 2 * PARALLEL_DOCUMENTS);
        for (i, (document, svc)) in f.services.iter().enumerate() {
            assert_eq!(*document, i + 2, "the config is document 1");
            assert_eq!(svc.metadata.name.as_deref(), Some(format!("s{i}").as_str()));
        }
        let mut docs: Vec<String> = (0..2 * PARALLEL_DOCUMENTS).map(svc).collect();
        docs[PARALLEL_DOCUMENTS + 100] = "---\nkind: [unclosed\n".into();
        docs[PARALLEL_DOCUMENTS / 2] =
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n".into();
        let bad: String = std::iter::once(HEAD.to_string()).chain(docs).collect();
        let e = ConfigFile::parse("t.yaml", &bad).unwrap_err().to_string();
        let first = PARALLEL_DOCUMENTS / 2 + 2;
        assert!(e.contains(&format!("document {first}")), "{e}");
    }

    #[test]
    fn a_cached_reload_gives_what_a_fresh_parse_gives() {
        let svc = |n: &str, ip: &str| {
            format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{{ip}ports: [{{name: p, port: 80}}]}}\n")
        };
        let eps = |n: &str, addr: &str| {
            format!("---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {n}}}\nsubsets: [{{addresses: [{{ip: {addr}}}], ports: [{{name: p, port: 8080}}]}}]\n")
        };
        let first = format!(
            "{HEAD}{}{}{}{}",
            svc("a", "clusterIP: 10.96.0.5, "),
            eps("a", "10.1.0.1"),
            svc("b", ""),
            eps("b", "10.1.0.2")
        );
        // a's endpoints change, b's document is untouched, c is new and takes an address.
        let second = format!(
            "{HEAD}{}{}{}{}{}{}",
            svc("a", "clusterIP: 10.96.0.5, "),
            eps("a", "10.1.0.9"),
            svc("b", ""),
            eps("b", "10.1.0.2"),
            svc("c", ""),
            eps("c", "10.1.0.3")
        );
        let mut cache = ParseCache::default();
        for text in [&first, &second, &first, &second] {
            let f = ConfigFile::parse_cached("test.yaml", text, &mut cache).unwrap();
            let s = f.settings().unwrap();
            let (cached, _) = f.desired_state_cached(&s, &mut cache).unwrap();
            assert_eq!(cached, state(text).unwrap());
        }
    }

    #[test]
    fn services_get_stable_cluster_ips_and_endpoints() {
        let text = format!(
            "{HEAD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: web}}\nsubsets: [{{addresses: [{{ip: 10.1.0.1}}], ports: [{{name: http, port: 8080}}]}}]\n"
        );
        let a = state(&text).unwrap();
        let b = state(&text).unwrap();
        let name = ServicePortName::new("default", "web", "http");
        assert_eq!(a.services[&name].cluster_ip, b.services[&name].cluster_ip);
        assert_eq!(a.endpoints[&name].len(), 1);
    }

    #[test]
    fn errors_name_file_document_object_and_field() {
        let text = format!("{HEAD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: notaport}}]}}\n");
        let e = state(&text).unwrap_err().to_string();
        assert!(
            e.contains("test.yaml")
                && e.contains("document 2")
                && e.contains("Service default/web")
                && e.contains("spec.ports[0].port"),
            "{e}"
        );
    }

    #[test]
    fn unknown_config_field_is_named() {
        let e = ConfigFile::parse("f.yaml", &format!("{HEAD}udpIdleTimout: 1s\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.yaml") && e.contains("document 1") && e.contains("udpIdleTimout"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_portal_is_an_error() {
        let text = format!(
            "{HEAD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{clusterIP: 10.96.0.5, ports: [{{port: 80}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: b}}\nspec: {{clusterIP: 10.96.0.5, ports: [{{port: 80}}]}}\n"
        );
        let e = state(&text).unwrap_err().to_string();
        assert!(
            e.contains("document 3")
                && e.contains("Service default/b")
                && e.contains("already used by default/a"),
            "{e}"
        );
    }

    #[test]
    fn headless_external_name_and_sctp_are_skipped() {
        let text = format!(
            "{HEAD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: h}}\nspec: {{clusterIP: None, ports: [{{port: 80}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: x}}\nspec: {{type: ExternalName, externalName: example.com}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {{ports: [{{port: 9, protocol: SCTP}}]}}\n"
        );
        let f = ConfigFile::parse("t", &text).unwrap();
        let (st, skipped) = f.desired_state(&f.settings().unwrap()).unwrap();
        assert!(st.services.is_empty());
        assert_eq!(skipped.len(), 3);
    }

    #[test]
    fn unknown_kind_and_misplaced_config_are_errors() {
        let e = ConfigFile::parse("t", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("document 1") && e.contains("unsupported object"),
            "{e}"
        );
        let e = ConfigFile::parse(
            "t",
            &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\n---\n{HEAD}"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be the first document"), "{e}");
    }

    #[test]
    fn documents_split_at_markers_only() {
        let docs = split_documents(
            "# comment\n---\na: 1\n---\nb: |\n  text --- not a marker\n--- {c: 3}\n",
        );
        assert_eq!(
            docs,
            vec!["\na: 1\n", "\nb: |\n  text --- not a marker\n", " {c: 3}\n"]
        );
        assert_eq!(split_documents("a: 1\n"), vec!["a: 1\n"]);
    }

    #[test]
    fn cached_reparse_gives_the_same_result_and_reuses_documents() {
        let text = format!(
            "{HEAD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"
        );
        let mut cache = ParseCache::default();
        let a = ConfigFile::parse_cached("t", &text, &mut cache).unwrap();
        assert_eq!(cache.docs.len(), 2);
        let more = format!("{text}---\napiVersion: v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{ports: [{{port: 81}}]}}\n");
        let b = ConfigFile::parse_cached("t", &more, &mut cache).unwrap();
        assert_eq!(cache.docs.len(), 3);
        assert_eq!(a.services[0], b.services[0]);
        assert_eq!(b.services.len(), 2);
        // A broken document still fails on a cached parse, naming its position.
        let broken = format!("{text}---\napiVersion: v1\nkind: Service\nmetadata: {{name: x}}\nspec: {{ports: [{{port: nope}}]}}\n");
        let e = ConfigFile::parse_cached("t", &broken, &mut cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("document 3"), "{e}");
    }

    #[test]
    fn service_range_violation_names_the_service() {
        let text = format!("{HEAD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: w, namespace: n}}\nspec: {{clusterIP: 192.0.2.1, ports: [{{port: 80}}]}}\n");
        let e = state(&text).unwrap_err().to_string();
        assert!(
            e.contains("document 2") && e.contains("Service n/w") && e.contains("spec.clusterIP"),
            "{e}"
        );
    }
}
