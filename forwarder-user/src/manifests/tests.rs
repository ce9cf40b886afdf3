use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fwd-manifests-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
";

const SLICE_AND_NODE: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.2]}]
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
";

fn names(objects: &Objects) -> Vec<String> {
    let mut names: Vec<String> = objects
        .services
        .iter()
        .map(|s| format!("svc {}", s.metadata.name.as_deref().unwrap()))
        .chain(
            objects.slices.iter().map(|s| format!("slice {}", s.metadata.name.as_deref().unwrap())),
        )
        .chain(
            objects.nodes.iter().map(|n| format!("node {}", n.metadata.name.as_deref().unwrap())),
        )
        .collect();
    names.sort();
    names
}

#[test]
fn reads_a_directory_of_manifests() {
    let dir = TempDir::new();
    dir.write("a.yaml", SERVICE);
    dir.write("b.yml", SLICE_AND_NODE);
    dir.write("notes.txt", "not a manifest");
    let (objects, problems) = ManifestSource::new(&dir.0).load();
    assert_eq!(problems, []);
    assert_eq!(names(&objects), ["node node-a", "slice web-1", "svc web"]);
}

#[test]
fn reads_a_single_file() {
    let dir = TempDir::new();
    let file = dir.write("all.yaml", &format!("{SERVICE}---{SLICE_AND_NODE}"));
    let (objects, problems) = ManifestSource::new(file).load();
    assert_eq!(problems, []);
    assert_eq!(names(&objects).len(), 3);
}

#[test]
fn bad_objects_are_reported_with_file_name_and_reason_and_the_rest_applies() {
    let dir = TempDir::new();
    let file = dir.write(
        "mixed.yaml",
        &format!(
            "{SERVICE}---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: app}}
---
apiVersion: v1
kind: Service
metadata: {{name: broken, namespace: demo}}
spec: {{ports: [{{port: eighty}}]}}
"
        ),
    );
    let (objects, problems) = ManifestSource::new(&dir.0).load();
    assert_eq!(names(&objects), ["svc web"]);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert_eq!(problems[0].file, file);
    assert_eq!(problems[0].object, "Deployment default/app");
    assert!(problems[0].reason.contains("unsupported"), "{}", problems[0]);
    assert_eq!(problems[1].object, "Service demo/broken");
    assert!(problems[1].reason.contains("invalid type"), "{}", problems[1]);
}

#[test]
fn a_broken_edit_keeps_the_last_good_state() {
    let dir = TempDir::new();
    dir.write("svc.yaml", SERVICE);
    let mut source = ManifestSource::new(&dir.0);
    let (first, _) = source.load();

    // The object becomes invalid: its last good version stays.
    dir.write("svc.yaml", &SERVICE.replace("port: 80", "port: [80]"));
    let (objects, problems) = source.load();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].reason.contains("keeping its last good version"), "{}", problems[0]);
    assert_eq!(objects.services, first.services);

    // The whole file becomes unparsable: same.
    dir.write("svc.yaml", "kind: Service\n  bad: [indent");
    let (objects, problems) = source.load();
    assert!(problems[0].reason.contains("invalid YAML"), "{}", problems[0]);
    assert_eq!(objects.services, first.services);

    // Deleting the file removes its objects.
    fs::remove_file(dir.0.join("svc.yaml")).unwrap();
    let (objects, problems) = source.load();
    assert_eq!(problems, []);
    assert!(objects.services.is_empty());
}

#[test]
fn fingerprint_sees_a_same_size_rewrite_within_one_mtime_tick() {
    let dir = TempDir::new();
    let path = dir.write("svc.yaml", SERVICE);
    let source = ManifestSource::new(&dir.0);
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let before = source.fingerprint();
    fs::write(&path, SERVICE.replace("10.96.0.10", "10.96.0.11")).unwrap();
    // Force the same size and mtime, as a write within one tick would leave.
    fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    assert_ne!(source.fingerprint(), before);
}

#[test]
fn fingerprint_changes_when_a_file_changes() {
    let dir = TempDir::new();
    dir.write("svc.yaml", SERVICE);
    let source = ManifestSource::new(&dir.0);
    let before = source.fingerprint();
    dir.write("svc.yaml", &format!("{SERVICE}\n# edited\n"));
    assert_ne!(source.fingerprint(), before);
}
