//! Kubernetes objects from YAML/JSON files: the source when there is no
//! cluster. Bad files and objects are reported and skipped; what was last
//! read successfully from them stays in force.
use std::{
    collections::BTreeMap,
    fmt, fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

/// The objects a sync works from (shared, not copied: the API cache holds
/// tens of thousands of them).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
}

/// A file or object that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// `Kind namespace/name`, or `-` when the file itself is unreadable.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.object, self.reason)
    }
}

#[derive(Clone, Debug)]
enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Node(Box<Node>),
}

/// `(kind, namespace, name)`: identifies an object within a file.
type ObjectId = (&'static str, String, String);

/// Change detection: name, size and mtime of every manifest file, plus a
/// content hash of files modified in the last seconds, since two writes
/// within one timestamp tick can leave size and mtime unchanged.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>, Option<u64>)>;

/// Files modified more recently than this are also hashed.
const RACY_WINDOW: Duration = Duration::from_secs(2);

pub struct ManifestSource {
    root: PathBuf,
    last_good: BTreeMap<PathBuf, BTreeMap<ObjectId, Object>>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

impl ManifestSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), last_good: BTreeMap::new() }
    }

    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        if !self.root.is_dir() {
            fs::metadata(&self.root)?;
            return Ok(vec![self.root.clone()]);
        }
        let mut files: Vec<PathBuf> = fs::read_dir(&self.root)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_manifest(p))
            .collect();
        files.sort();
        Ok(files)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        let now = SystemTime::now();
        self.files()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let meta = fs::metadata(&p).ok();
                let len = meta.as_ref().map_or(0, fs::Metadata::len);
                let mtime = meta.and_then(|m| m.modified().ok());
                let recent = mtime
                    .is_none_or(|t| now.duration_since(t).map_or(true, |age| age < RACY_WINDOW));
                let hash = recent.then(|| fs::read(&p).ok()).flatten().map(|bytes| {
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    bytes.hash(&mut hasher);
                    hasher.finish()
                });
                (p, len, mtime, hash)
            })
            .collect()
    }

    /// Reads every manifest. Problems are returned beside the objects.
    pub fn load(&mut self) -> (Objects, Vec<Problem>) {
        let mut problems = Vec::new();
        match self.files() {
            Ok(files) => {
                self.last_good.retain(|path, _| files.contains(path));
                for file in files {
                    let previous = self.last_good.remove(&file).unwrap_or_default();
                    let current = read_file(&file, previous, &mut problems);
                    self.last_good.insert(file, current);
                }
            }
            Err(err) => problems.push(Problem {
                file: self.root.clone(),
                object: "-".into(),
                reason: format!("cannot read: {err}; keeping the last good state"),
            }),
        }
        let mut objects = Objects::default();
        for object in self.last_good.values().flat_map(BTreeMap::values) {
            match object.clone() {
                Object::Service(s) => objects.services.push(Arc::from(s)),
                Object::Slice(s) => objects.slices.push(Arc::from(s)),
                Object::Node(n) => objects.nodes.push(Arc::from(n)),
            }
        }
        (objects, problems)
    }
}

/// Parses one file; a broken file or object falls back to `previous`.
fn read_file(
    file: &Path,
    mut previous: BTreeMap<ObjectId, Object>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<ObjectId, Object> {
    let mut problem = |object: String, reason: String| {
        problems.push(Problem { file: file.to_owned(), object, reason });
    };
    let text = match fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) => {
            problem("-".into(), format!("cannot read: {err}; keeping its last good objects"));
            return previous;
        }
    };
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => docs.push(value),
            Err(err) => {
                problem("-".into(), format!("invalid YAML: {err}; keeping its last good objects"));
                return previous;
            }
        }
    }
    let mut current = BTreeMap::new();
    for value in docs {
        let str_field = |v: &serde_yaml::Value, path: &[&str]| {
            path.iter().try_fold(v, |v, k| v.get(k)).and_then(|v| v.as_str()).map(str::to_owned)
        };
        let api_version = str_field(&value, &["apiVersion"]).unwrap_or_default();
        let kind_name = str_field(&value, &["kind"]).unwrap_or_default();
        let namespace = str_field(&value, &["metadata", "namespace"]);
        let name = str_field(&value, &["metadata", "name"]);
        let label = format!(
            "{kind_name} {}/{}",
            namespace.as_deref().unwrap_or("default"),
            name.as_deref().unwrap_or("<unnamed>")
        );
        let kind: &'static str = match (api_version.as_str(), kind_name.as_str()) {
            ("v1", "Service") => "Service",
            ("discovery.k8s.io/v1", "EndpointSlice") => "EndpointSlice",
            ("v1", "Node") => "Node",
            _ => {
                problem(
                    label,
                    format!("unsupported object {api_version:?}/{kind_name:?}, ignored"),
                );
                continue;
            }
        };
        let Some(name) = name else {
            problem(label, "metadata.name is missing".into());
            continue;
        };
        // Namespaced kinds default to "default", as kubectl does.
        let namespace = match kind {
            "Node" => String::new(),
            _ => namespace.unwrap_or_else(|| "default".into()),
        };
        let id = (kind, namespace.clone(), name);
        let parsed = match kind {
            "Service" => serde_yaml::from_value::<Service>(value).map(|mut s| {
                s.metadata.namespace = Some(namespace);
                Object::Service(Box::new(s))
            }),
            "EndpointSlice" => serde_yaml::from_value::<EndpointSlice>(value).map(|mut s| {
                s.metadata.namespace = Some(namespace);
                Object::Slice(Box::new(s))
            }),
            _ => serde_yaml::from_value::<Node>(value).map(|n| Object::Node(Box::new(n))),
        };
        match parsed {
            Ok(object) => {
                if current.insert(id, object).is_some() {
                    problem(label, "defined twice in this file; the last one wins".into());
                }
            }
            Err(err) => match previous.remove(&id) {
                Some(old) => {
                    problem(label, format!("{err}; keeping its last good version"));
                    current.insert(id, old);
                }
                None => problem(label, format!("{err}; skipped")),
            },
        }
    }
    current
}

#[cfg(test)]
mod tests;
