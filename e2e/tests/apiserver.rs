//! The API-server double against the real `kube` client, watcher and lease manager.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use futures::{Stream, StreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, ResourceExt};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_e2e::apiserver::{API_AUDIENCE, ApiServerDouble};

async fn double() -> (ApiServerDouble, Client) {
    let double = ApiServerDouble::start().await.unwrap();
    let client = double.client().await.unwrap();
    (double, client)
}

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

fn fixture(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace}})
}

/// The API error of a failed call: (code, reason, message).
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> (u16, String, String) {
    match result {
        Err(kube::Error::Api(status)) => {
            (status.code, status.reason.clone(), status.message.clone())
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn next<S, T>(stream: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("no event within 10s")
        .expect("stream ended")
}

/// Skips errors (a cut connection may surface as one) and returns the next event.
async fn next_event<S>(stream: &mut S, errors: &mut Vec<String>) -> Event<ConfigMap>
where
    S: Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Unpin,
{
    loop {
        match next(stream).await {
            Ok(event) => return event,
            Err(e) => errors.push(e.to_string()),
        }
    }
}

/// Reads events up to InitDone and returns the names of the InitApply objects.
async fn initial_names<S>(stream: &mut S, errors: &mut Vec<String>) -> BTreeSet<String>
where
    S: Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Unpin,
{
    assert!(matches!(next_event(stream, errors).await, Event::Init));
    let mut names = BTreeSet::new();
    loop {
        match next_event(stream, errors).await {
            Event::InitApply(cm) => names.insert(cm.name_any()),
            Event::InitDone => return names,
            other => panic!("unexpected event during the initial list: {other:?}"),
        };
    }
}

fn applied_name(event: Event<ConfigMap>) -> String {
    match event {
        Event::Apply(cm) => cm.name_any(),
        other => panic!("expected Apply, got {other:?}"),
    }
}

#[tokio::test]
async fn crud_with_conflicts_generate_name_and_finalizers() {
    let (_double, client) = double().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();

    let created = api
        .create(&pp, &config_map("one", &[("k", "v")]))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    let (code, reason, _) = api_error(api.create(&pp, &config_map("one", &[])).await);
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    let mut fresh = created.clone();
    fresh.data = Some(BTreeMap::from([("k".into(), "v2".into())]));
    let updated = api.replace("one", &pp, &fresh).await.unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    assert_eq!(updated.metadata.generation, Some(2));
    assert_eq!(updated.metadata.uid, created.metadata.uid);
    // `fresh` still carries the resourceVersion `updated` replaced.
    let (code, reason, _) = api_error(api.replace("one", &pp, &fresh).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(api.get("one").await.unwrap().data.unwrap()["k"], "v2");

    let generated = ConfigMap {
        metadata: ObjectMeta {
            generate_name: Some("gen-".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let generated = api.create(&pp, &generated).await.unwrap();
    assert!(generated.name_any().starts_with("gen-") && generated.name_any().len() == 9);

    assert!(
        api.delete("one", &DeleteParams::default())
            .await
            .unwrap()
            .is_left()
    );
    let (code, reason, _) = api_error(api.get("one").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));

    // With a finalizer, delete only marks the object; removing the finalizer deletes it.
    let mut held = config_map("held", &[]);
    held.metadata.finalizers = Some(vec!["weft.dev/test".into()]);
    api.create(&pp, &held).await.unwrap();
    api.delete("held", &DeleteParams::default()).await.unwrap();
    let marked = api.get("held").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    let patch = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    api.patch("held", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(api_error(api.get("held").await).0, 404);
}

#[tokio::test]
async fn list_pages_are_a_consistent_snapshot() {
    let (double, client) = double().await;
    for i in 0..5 {
        double
            .apply_object(fixture("paged", &format!("cm-{i}")))
            .unwrap();
    }
    double.apply_object(fixture("elsewhere", "other")).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "paged");

    let (mut names, mut versions, mut sizes) = (Vec::new(), BTreeSet::new(), Vec::new());
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.unwrap();
        sizes.push(page.items.len());
        versions.insert(page.metadata.resource_version.clone().unwrap());
        names.extend(page.items.iter().map(|cm| cm.name_any()));
        if sizes.len() == 1 {
            // Changes after the first page do not show in later pages.
            double.apply_object(fixture("paged", "cm-9")).unwrap();
            double
                .delete_object("v1", "ConfigMap", Some("paged"), "cm-3")
                .unwrap();
        }
        token = page.metadata.continue_;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(
        versions.len(),
        1,
        "every page is at the first page's resourceVersion"
    );
    assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);

    // A new list sees the changes.
    let now: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(now, ["cm-0", "cm-1", "cm-2", "cm-4", "cm-9"]);

    // A continue token from before a compaction is expired.
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    double.apply_object(fixture("paged", "after")).unwrap();
    double.compact();
    let stale = ListParams::default()
        .limit(2)
        .continue_token(first.metadata.continue_.as_deref().unwrap());
    let (code, reason, _) = api_error(api.list(&stale).await);
    assert_eq!((code, reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let (double, client) = double().await;
    for i in 0..6 {
        let mut cm = fixture("sel", &format!("cm-{i}"));
        if i < 5 {
            let parity = if i % 2 == 0 { "even" } else { "odd" };
            cm["metadata"]["labels"] = json!({"parity": parity});
        }
        double.apply_object(cm).unwrap();
    }
    double.apply_object(fixture("elsewhere", "cm-0")).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "sel");
    let names = |selector: ListParams| {
        let api = api.clone();
        async move {
            let list = api.list(&selector).await.unwrap();
            list.iter().map(|c| c.name_any()).collect::<Vec<_>>()
        }
    };
    let labels = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(labels("parity=even")).await, ["cm-0", "cm-2", "cm-4"]);
    assert_eq!(names(labels("parity in (odd)")).await, ["cm-1", "cm-3"]);
    assert_eq!(
        names(labels("parity notin (even)")).await,
        ["cm-1", "cm-3", "cm-5"]
    );
    assert_eq!(names(labels("!parity")).await, ["cm-5"]);
    assert_eq!(
        names(labels("parity,parity!=odd")).await,
        ["cm-0", "cm-2", "cm-4"]
    );
    let fields = |s: &str| ListParams::default().fields(s);
    assert_eq!(names(fields("metadata.name=cm-3")).await, ["cm-3"]);
    assert_eq!(names(fields("metadata.name!=cm-3")).await.len(), 5);

    let all: Api<ConfigMap> = Api::all(client);
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        7
    );
    let elsewhere = all
        .list(&fields("metadata.namespace=elsewhere"))
        .await
        .unwrap();
    assert_eq!(elsewhere.items.len(), 1);
    assert_eq!(elsewhere.items[0].namespace().as_deref(), Some("elsewhere"));
    let (code, _, message) = api_error(api.list(&fields("spec.bogus=1")).await);
    assert!(code == 400 && message.contains("spec.bogus"), "{message}");
}

#[tokio::test]
async fn watcher_lists_then_follows_changes() {
    let (double, client) = double().await;
    for name in ["a", "b"] {
        double.apply_object(fixture("w", name)).unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(client, "w");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut errors = Vec::new();
    assert_eq!(
        initial_names(&mut events, &mut errors).await,
        BTreeSet::from(["a".into(), "b".into()])
    );

    api.create(&PostParams::default(), &config_map("c", &[]))
        .await
        .unwrap();
    assert_eq!(
        applied_name(next_event(&mut events, &mut errors).await),
        "c"
    );
    api.delete("a", &DeleteParams::default()).await.unwrap();
    match next_event(&mut events, &mut errors).await {
        Event::Delete(cm) => assert_eq!(cm.name_any(), "a"),
        other => panic!("expected Delete, got {other:?}"),
    }
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(double.watch_count(), 1);
    // The watcher pages its list with limit=500 and then watches once.
    assert_eq!(double.requests("list", "configmaps", ""), 1);
    assert_eq!(double.requests("watch", "configmaps", ""), 1);
}

#[tokio::test]
async fn watcher_with_streaming_list_gets_initial_events() {
    let (double, client) = double().await;
    double.apply_object(fixture("s", "a")).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "s");
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut errors = Vec::new();
    assert_eq!(
        initial_names(&mut events, &mut errors).await,
        BTreeSet::from(["a".into()])
    );
    api.create(&PostParams::default(), &config_map("b", &[]))
        .await
        .unwrap();
    assert_eq!(
        applied_name(next_event(&mut events, &mut errors).await),
        "b"
    );
    assert_eq!(double.requests("list", "configmaps", ""), 0);
}

#[tokio::test]
async fn watcher_resumes_after_a_cut_without_losing_events() {
    let (double, client) = double().await;
    double.apply_object(fixture("w", "a")).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "w");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut errors = Vec::new();
    initial_names(&mut events, &mut errors).await;
    double.apply_object(fixture("w", "b")).unwrap();
    assert_eq!(
        applied_name(next_event(&mut events, &mut errors).await),
        "b"
    );
    assert_eq!(double.watch_count(), 1);

    double.cut_watches();
    assert_eq!(double.watch_count(), 0);
    // Made while no watch is open: the resumed watch must replay it.
    double.apply_object(fixture("w", "c")).unwrap();
    assert_eq!(
        applied_name(next_event(&mut events, &mut errors).await),
        "c"
    );
    // kube reads the torn-down stream as an EOF and resumes quietly.
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        double.requests("list", "configmaps", ""),
        1,
        "resumed without a relist"
    );
    assert_eq!(double.requests("watch", "configmaps", ""), 2);
    assert_eq!(double.watch_count(), 1);
}

#[tokio::test]
async fn watcher_relists_after_compaction() {
    let (double, client) = double().await;
    double.apply_object(fixture("w", "a")).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "w");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut errors = Vec::new();
    initial_names(&mut events, &mut errors).await;
    double.apply_object(fixture("w", "b")).unwrap();
    assert_eq!(
        applied_name(next_event(&mut events, &mut errors).await),
        "b"
    );

    // The watcher only reconnects when polled, so this all happens while it is away.
    double.cut_watches();
    double.apply_object(fixture("w", "c")).unwrap();
    double
        .delete_object("v1", "ConfigMap", Some("w"), "a")
        .unwrap();
    double.compact();

    let names = initial_names(&mut events, &mut errors).await;
    assert_eq!(names, BTreeSet::from(["b".into(), "c".into()]));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("410") || e.contains("too old")),
        "{errors:?}"
    );
    assert_eq!(double.requests("list", "configmaps", ""), 2);
}

#[tokio::test]
async fn watch_sends_bookmarks_honours_timeouts_and_selectors() {
    let (double, client) = double().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let start_rv = double.resource_version();
    let started = Instant::now();
    let mut stream = api
        .watch(&WatchParams::default().timeout(3), &start_rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(8), stream.next())
        .await
        .unwrap()
    {
        match event.unwrap() {
            WatchEvent::Bookmark(b) => {
                seen.push(("BOOKMARK", b.metadata.resource_version));
                if seen.len() == 1 {
                    api.create(&PostParams::default(), &config_map("x", &[]))
                        .await
                        .unwrap();
                }
            }
            WatchEvent::Added(cm) => seen.push(("ADDED", cm.resource_version().unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2500) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    assert_eq!(seen[0], ("BOOKMARK", start_rv));
    let added = seen
        .iter()
        .position(|(t, _)| *t == "ADDED")
        .expect("the create was watched");
    let new_rv = seen[added].1.clone();
    assert!(
        seen[added..]
            .iter()
            .any(|e| *e == ("BOOKMARK", new_rv.clone())),
        "{seen:?}"
    );

    // Without allowWatchBookmarks there are none.
    let params = WatchParams::default().timeout(2).disable_bookmarks();
    let quiet: Vec<_> = api
        .watch(&params, &double.resource_version())
        .await
        .unwrap()
        .collect()
        .await;
    assert!(quiet.is_empty(), "{} events", quiet.len());

    // An object that stops matching a label selector is DELETED for that watch.
    let mut labelled = config_map("l", &[]);
    labelled.metadata.labels = Some(BTreeMap::from([("app".into(), "web".into())]));
    api.create(&PostParams::default(), &labelled).await.unwrap();
    let params = WatchParams::default().labels("app=web").disable_bookmarks();
    let mut stream = api.watch(&params, "0").await.unwrap().boxed();
    assert!(
        matches!(next(&mut stream).await.unwrap(), WatchEvent::Added(cm) if cm.name_any() == "l")
    );
    let patch = Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}}));
    api.patch("l", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert!(
        matches!(next(&mut stream).await.unwrap(), WatchEvent::Deleted(cm) if cm.name_any() == "l")
    );
}

fn traffic_split_api(client: Client) -> (Api<DynamicObject>, ApiResource) {
    let gvk = GroupVersionKind::gvk("split.smi-spec.io", "v1alpha4", "TrafficSplit");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "trafficsplits");
    (Api::namespaced_with(client, "default", &resource), resource)
}

#[tokio::test]
async fn status_apply_changes_only_status() {
    let (double, client) = double().await;
    let (api, resource) = traffic_split_api(client);
    let spec = json!({"service": "web", "backends": [{"service": "web-v1", "weight": 100}]});
    let split = DynamicObject::new("split", &resource)
        .data(json!({"spec": spec, "status": {"ignored": true}}));
    let created = api.create(&PostParams::default(), &split).await.unwrap();
    assert!(
        created.data.get("status").is_none(),
        "create ignores status"
    );
    assert_eq!(created.metadata.generation, Some(1));

    let status = json!({
        "apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
        "spec": {"service": "ignored"},
        "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Valid", "message": "",
                                   "lastTransitionTime": "2025-01-01T00:00:00Z"}]},
    });
    let apply = PatchParams::apply("weft");
    let applied = api
        .patch_status("split", &apply, &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(applied.data["status"]["conditions"][0]["type"], "Accepted");
    assert_eq!(applied.data["spec"], spec);
    assert_ne!(
        applied.metadata.resource_version,
        created.metadata.resource_version
    );
    assert_eq!(applied.metadata.generation, Some(1));
    let entry = applied
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| m.manager.as_deref() == Some("weft"))
        .unwrap();
    assert_eq!(entry.operation.as_deref(), Some("Apply"));
    assert_eq!(entry.subresource.as_deref(), Some("status"));
    assert_eq!(entry.fields_type.as_deref(), Some("FieldsV1"));
    assert!(entry.fields_v1.as_ref().unwrap().0["f:status"]["f:conditions"].is_object());

    let again = api
        .patch_status("split", &apply, &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version, applied.metadata.resource_version,
        "a no-op apply writes nothing"
    );
    assert_eq!(double.requests("patch", "trafficsplits", "status"), 2);
    assert_eq!(
        double.requests("patch", "trafficsplits.split.smi-spec.io", "status"),
        2
    );
    assert_eq!(double.requests("patch", "trafficsplits", ""), 0);

    // Another manager applying the same field conflicts with weft unless it forces.
    let rival = json!({
        "apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
        "status": {"conditions": [{"type": "Accepted", "status": "False", "reason": "Rival", "message": "",
                                   "lastTransitionTime": "2025-01-01T00:00:01Z"}]},
    });
    let (code, reason, message) = api_error(
        api.patch_status("split", &PatchParams::apply("rival"), &Patch::Apply(&rival))
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(
        message.contains("\"weft\"") && message.contains(".status.conditions"),
        "{message}"
    );
    let forced = api
        .patch_status(
            "split",
            &PatchParams::apply("rival").force(),
            &Patch::Apply(&rival),
        )
        .await
        .unwrap();
    assert_eq!(forced.data["status"]["conditions"][0]["reason"], "Rival");
    assert_eq!(forced.metadata.generation, Some(1));
    let status_owners: Vec<_> = (forced.metadata.managed_fields.iter().flatten())
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:status").is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        status_owners,
        ["rival"],
        "forcing takes the field from weft"
    );

    // The main resource ignores status; a spec change bumps generation.
    let patch = Patch::Merge(json!({"spec": {"service": "web2"}, "status": {"conditions": []}}));
    let patched = api
        .patch("split", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(
        patched.data["status"]["conditions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let mut put = patched.clone();
    put.data["status"] = json!({"conditions": []});
    put.data["spec"]["service"] = json!("not-via-status");
    let replaced = api
        .replace_status("split", &PostParams::default(), &put)
        .await
        .unwrap();
    assert_eq!(replaced.data["status"]["conditions"], json!([]));
    assert_eq!(replaced.data["spec"]["service"], "web2");
    assert_eq!(replaced.metadata.generation, Some(2));
}

#[tokio::test]
async fn apply_conflicts_between_field_managers() {
    let (_double, client) = double().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let apply = |data: Value| {
        let mut body =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}});
        if !data.is_null() {
            body["data"] = data;
        }
        Patch::Apply(body)
    };
    let as_ = |manager: &str| PatchParams::apply(manager);
    let data = |cm: ConfigMap| cm.data.unwrap_or_default();

    api.patch("shared", &as_("alice"), &apply(json!({"a": "1", "b": "1"})))
        .await
        .unwrap();
    let (code, reason, message) = api_error(
        api.patch("shared", &as_("bob"), &apply(json!({"a": "2"})))
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(
        message.contains("\"alice\"") && message.contains(".data.a"),
        "{message}"
    );
    // The same value is co-owned, so alice dropping it leaves it; b had only alice.
    api.patch("shared", &as_("bob"), &apply(json!({"a": "1"})))
        .await
        .unwrap();
    let now = data(
        api.patch("shared", &as_("alice"), &apply(Value::Null))
            .await
            .unwrap(),
    );
    assert_eq!(now, BTreeMap::from([("a".into(), "1".into())]));

    assert_eq!(
        api_error(
            api.patch("shared", &as_("carol"), &apply(json!({"a": "9"})))
                .await
        )
        .0,
        409
    );
    let forced = api
        .patch("shared", &as_("carol").force(), &apply(json!({"a": "9"})))
        .await
        .unwrap();
    assert_eq!(data(forced)["a"], "9");
    let (code, _, message) = api_error(
        api.patch("shared", &as_("bob"), &apply(json!({"a": "1"})))
            .await,
    );
    assert!(code == 409 && message.contains("\"carol\""), "{message}");

    // A non-apply write takes the fields it changes.
    let merge = PatchParams {
        field_manager: Some("dave".into()),
        ..Default::default()
    };
    api.patch(
        "shared",
        &merge,
        &Patch::Merge(json!({"data": {"a": "10"}})),
    )
    .await
    .unwrap();
    let (code, _, message) = api_error(
        api.patch("shared", &as_("carol"), &apply(json!({"a": "9"})))
            .await,
    );
    assert!(code == 409 && message.contains("\"dave\""), "{message}");
    let managers: Vec<String> = api
        .get("shared")
        .await
        .unwrap()
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, ["dave"]);
}

#[tokio::test]
async fn merge_strategic_and_json_patches() {
    let (_double, client) = double().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PatchParams::default();
    api.create(
        &PostParams::default(),
        &config_map("p", &[("x", "1"), ("y", "2")]),
    )
    .await
    .unwrap();

    let merge =
        Patch::Merge(json!({"metadata": {"labels": {"l": "v"}}, "data": {"x": null, "z": "3"}}));
    let cm = api.patch("p", &pp, &merge).await.unwrap();
    assert_eq!(cm.labels()["l"], "v");
    assert_eq!(
        cm.data.unwrap(),
        BTreeMap::from([("y".into(), "2".into()), ("z".into(), "3".into())])
    );
    let cm = api
        .patch("p", &pp, &Patch::Strategic(json!({"data": {"y": "22"}})))
        .await
        .unwrap();
    assert_eq!(cm.data.unwrap()["y"], "22");

    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/y", "value": "22"},
        {"op": "replace", "path": "/data/y", "value": "23"},
        {"op": "add", "path": "/data/w", "value": "4"},
    ]))
    .unwrap();
    let cm = api.patch("p", &pp, &Patch::<()>::Json(ops)).await.unwrap();
    assert_eq!(
        cm.data.unwrap(),
        BTreeMap::from([
            ("w".into(), "4".into()),
            ("y".into(), "23".into()),
            ("z".into(), "3".into())
        ])
    );
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/y", "value": "0"}])).unwrap();
    assert_eq!(
        api_error(api.patch("p", &pp, &Patch::<()>::Json(failing)).await).0,
        422
    );

    let stale = Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"y": "x"}}));
    assert_eq!(api_error(api.patch("p", &pp, &stale).await).1, "Conflict");
    assert_eq!(api_error(api.patch("missing", &pp, &merge).await).0, 404);
}

async fn review(client: &Client, token: &str, audiences: &[&str]) -> Value {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.into(),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
        },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    serde_json::to_value(answer.status.unwrap()).unwrap()
}

#[tokio::test]
async fn token_review_checks_tokens_expiry_and_audience() {
    let (double, client) = double().await;
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "apps"}});
    let sa_uid = double.apply_object(sa).unwrap()["metadata"]["uid"].clone();
    let minute = Duration::from_secs(60);
    let token = double.issue_token("apps", "web", "web-0", "pod-uid-0", "weft", minute);

    // A JWT: a client reads `exp` and the claims without verifying the signature.
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let decode = |part: &str| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    };
    assert_eq!(decode(parts[0])["alg"], "RS256");
    let payload = decode(parts[1]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = payload["exp"].as_u64().unwrap();
    assert!((now + 58..=now + 60).contains(&exp), "exp {exp}, now {now}");
    assert!(payload["iat"].as_u64().unwrap() <= now && payload["nbf"] == payload["iat"]);
    assert_eq!(payload["iss"], API_AUDIENCE);
    assert_eq!(payload["sub"], "system:serviceaccount:apps:web");
    assert_eq!(payload["aud"], json!(["weft"]));
    let claims = &payload["kubernetes.io"];
    assert_eq!(claims["namespace"], "apps");
    assert_eq!(claims["pod"], json!({"name": "web-0", "uid": "pod-uid-0"}));
    assert_eq!(
        claims["serviceaccount"],
        json!({"name": "web", "uid": sa_uid})
    );

    let ok = review(&client, &token, &["weft"]).await;
    assert_eq!(ok["authenticated"], true);
    assert_eq!(ok["user"]["username"], "system:serviceaccount:apps:web");
    assert_eq!(ok["user"]["uid"], sa_uid);
    assert_eq!(
        ok["user"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["web-0"])
    );
    assert_eq!(
        ok["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!(["pod-uid-0"])
    );
    assert_eq!(ok["audiences"], json!(["weft"]));

    let wrong = review(&client, &token, &["other"]).await;
    assert!(
        wrong["authenticated"] != true && wrong["error"].as_str().unwrap().contains("audience")
    );
    let no_audience = review(&client, &token, &[]).await;
    assert!(
        no_audience["authenticated"] != true,
        "the API server's own audience is implied"
    );
    let api_token = double.issue_token("apps", "web", "web-0", "pod-uid-0", API_AUDIENCE, minute);
    assert_eq!(
        review(&client, &api_token, &[]).await["authenticated"],
        true
    );
    let expired = double.issue_token("apps", "web", "web-0", "pod-uid-0", "weft", Duration::ZERO);
    let expired = review(&client, &expired, &["weft"]).await;
    assert!(
        expired["authenticated"] != true && expired["error"].as_str().unwrap().contains("expired")
    );
    let unknown = review(&client, "not-a-token", &["weft"]).await;
    assert!(unknown["authenticated"] != true && unknown["error"].is_string());
    assert_eq!(double.requests("create", "tokenreviews", ""), 6);
    double.reset_requests();
    assert_eq!(double.requests("create", "tokenreviews", ""), 0);
}

const LEASE: &str = "weft-leader";

async fn lease_manager(client: &Client, identity: &str) -> LeaseManager {
    LeaseManagerBuilder::new(client.clone(), LEASE)
        .with_namespace("default")
        .with_identity(identity)
        .with_duration(2)
        .with_grace(1)
        .build()
        .await
        .unwrap()
}

fn lease_spec(double: &ApiServerDouble) -> LeaseSpec {
    let lease = double.get("coordination.k8s.io/v1", "Lease", Some("default"), LEASE);
    let lease: Lease = serde_json::from_value(lease.unwrap()).unwrap();
    lease.spec.unwrap_or_default()
}

/// Waits until `rx` says leader; how long that took.
async fn becomes_leader(rx: &tokio::sync::watch::Receiver<bool>, within: Duration) -> Duration {
    let start = Instant::now();
    while !*rx.borrow() {
        assert!(start.elapsed() < within, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

type Watching = (
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<kube_lease_manager::Result<LeaseManager>>,
);

/// Starts managers `a` and `b` on one Lease and checks that exactly one of them
/// holds it through more than two lease durations of renewals: (leader, follower).
async fn elect(
    double: &ApiServerDouble,
    client: &Client,
) -> ((&'static str, Watching), (&'static str, Watching)) {
    let a = lease_manager(client, "a").await.watch().await;
    let b = lease_manager(client, "b").await.watch().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !*a.0.borrow() && !*b.0.borrow() {
        assert!(Instant::now() < deadline, "nobody became leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_leads = *a.0.borrow();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(
            (*a.0.borrow(), *b.0.borrow()),
            (a_leads, !a_leads),
            "one leader at a time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (leader, follower) = if a_leads {
        (("a", a), ("b", b))
    } else {
        (("b", b), ("a", a))
    };
    let spec = lease_spec(double);
    assert_eq!(spec.holder_identity.as_deref(), Some(leader.0));
    assert_eq!(spec.lease_transitions, Some(1));
    assert!(
        double.requests("patch", "leases", "") >= 4,
        "renewals are patches"
    );
    (leader, follower)
}

#[tokio::test]
async fn lease_manager_fails_over_when_the_leader_stops_renewing() {
    let (double, client) = double().await;
    let ((_, (_, leader_task)), (follower_id, (follower, _task))) = elect(&double, &client).await;

    // The leader's task dies without releasing: the Lease expires, then changes hands.
    leader_task.abort();
    let took = becomes_leader(&follower, Duration::from_secs(8)).await;
    assert!(took < Duration::from_secs(5), "failover took {took:?}");
    let spec = lease_spec(&double);
    assert_eq!(spec.holder_identity.as_deref(), Some(follower_id));
    assert_eq!(spec.lease_transitions, Some(2));
}

#[tokio::test]
async fn lease_manager_hands_over_when_the_leader_releases() {
    let (double, client) = double().await;
    let ((_, (leader, leader_task)), (follower_id, (follower, _task))) =
        elect(&double, &client).await;

    // Dropping the receiver makes the leader release the Lease (a strategic merge
    // patch of nulls) and stop.
    drop(leader);
    leader_task.await.unwrap().unwrap();
    let released = lease_spec(&double);
    assert_eq!(released.holder_identity, None);
    assert_eq!(released.renew_time, None);
    assert_eq!(released.lease_transitions, Some(1));
    let took = becomes_leader(&follower, Duration::from_secs(8)).await;
    assert!(took < Duration::from_secs(4), "handover took {took:?}");
    let spec = lease_spec(&double);
    assert_eq!(spec.holder_identity.as_deref(), Some(follower_id));
    assert_eq!(spec.lease_transitions, Some(2));
}

async fn raw_http(double: &ApiServerDouble, request: &str) -> String {
    let addr = double.url().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn errors_are_statuses_and_the_kubeconfig_works() {
    let (double, client) = double().await;
    let request = |method: &str, uri: &str, content_type: &str, body: &str| {
        hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type)
            .body(body.as_bytes().to_vec())
            .unwrap()
    };
    let status = |result: kube::Result<String>| api_error(result);
    let json = "application/json";
    let (code, reason, _) = status(
        client
            .request_text(request("GET", "/apis/example.com/v1/widgets", json, ""))
            .await,
    );
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    let uri = "/api/v1/namespaces/default/configmaps";
    assert_eq!(
        status(
            client
                .request_text(request("POST", uri, json, "{not json"))
                .await
        )
        .1,
        "BadRequest"
    );
    double.apply_object(fixture("default", "cm")).unwrap();
    let uri = "/api/v1/namespaces/default/configmaps/cm";
    let merge = "application/merge-patch+json";
    assert_eq!(
        status(
            client
                .request_text(request("PATCH", uri, merge, "[1]"))
                .await
        )
        .0,
        400
    );
    assert_eq!(
        status(
            client
                .request_text(request("PATCH", uri, "text/plain", "{}"))
                .await
        )
        .0,
        415
    );
    let apply = "application/apply-patch+yaml";
    assert_eq!(
        status(
            client
                .request_text(request("PATCH", uri, apply, "data: {a: b}"))
                .await
        )
        .0,
        422
    );
    let yaml = client
        .request_text(request(
            "PATCH",
            &format!("{uri}?fieldManager=yaml"),
            apply,
            "data:\n  a: b\n",
        ))
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&yaml.unwrap()).unwrap()["data"]["a"],
        "b"
    );
    assert_eq!(
        status(
            client
                .request_text(request("GET", &format!("{uri}/status"), json, ""))
                .await
        )
        .0,
        404
    );

    let unauthenticated = raw_http(
        &double,
        "GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        unauthenticated.starts_with("HTTP/1.1 401"),
        "{unauthenticated}"
    );
    assert_eq!(client.apiserver_version().await.unwrap().major, "1");

    let path = std::env::temp_dir().join(format!("weft-double-kubeconfig-{}", std::process::id()));
    double.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let from_file = Client::try_from(config).unwrap();
    double
        .apply_object(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}),
        )
        .unwrap();
    let namespaces = Api::<Namespace>::all(from_file)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        namespaces
            .items
            .iter()
            .map(|n| n.name_any())
            .collect::<Vec<_>>(),
        ["apps"]
    );
}

#[tokio::test]
async fn discovery_and_cluster_scoped_kinds() {
    use kube::discovery::{Discovery, Scope};
    let (double, client) = double().await;
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let gvk = GroupVersionKind::gvk("split.smi-spec.io", "v1alpha4", "TrafficSplit");
    let (split, caps) = discovery.resolve_gvk(&gvk).unwrap();
    assert_eq!(
        (split.plural.as_str(), caps.scope),
        ("trafficsplits", Scope::Namespaced)
    );
    let gvk = GroupVersionKind::gvk("config.weft.dev", "v1alpha1", "MeshConfig");
    let (mesh, caps) = discovery.resolve_gvk(&gvk).unwrap();
    assert_eq!(caps.scope, Scope::Cluster);
    let gvk = GroupVersionKind::gvk("authentication.k8s.io", "v1", "TokenReview");
    assert!(discovery.resolve_gvk(&gvk).is_some());

    let api: Api<DynamicObject> = Api::all_with(client, &mesh);
    let config = DynamicObject::new("mesh", &mesh).data(json!({"spec": {"mtls": "strict"}}));
    let created = api.create(&PostParams::default(), &config).await.unwrap();
    assert_eq!(created.metadata.namespace, None);
    assert_eq!(
        api.get("mesh").await.unwrap().data["spec"]["mtls"],
        "strict"
    );
    let stored = double.get("config.weft.dev/v1alpha1", "MeshConfig", None, "mesh");
    assert_eq!(
        stored.unwrap()["metadata"]["uid"],
        json!(created.metadata.uid)
    );
    assert_eq!(
        double.requests("create", "meshconfigs.config.weft.dev", ""),
        1
    );
    assert_eq!(double.requests("create", "meshconfigs.other.group", ""), 0);
}
