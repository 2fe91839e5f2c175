//! The tier over object_store's memory store: keys, verification, write-behind, tags.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::*;
use crate::config::{Circuit, S3Config};
use crate::oci::media::AcceptSet;
use crate::store::MemoryStore;

fn config(prefix: &str) -> SharedConfig {
    SharedConfig {
        s3: S3Config {
            endpoint: None,
            bucket: "dockside".into(),
            region: "us-east-1".into(),
            prefix: prefix.into(),
            profile: None,
        },
        timeout: Duration::from_secs(5),
        circuit: Circuit {
            failures: 3,
            cooldown: Duration::from_secs(30),
        },
        upload_queue: 16,
        max_age: None,
    }
}

fn tier(store: &Arc<InMemory>) -> Arc<S3Tier> {
    let metrics = Metrics::new();
    S3Tier::with_store(store.clone(), &config("cache/"), "mem", &metrics)
}

async fn keys(store: &InMemory) -> Vec<String> {
    let mut out: Vec<String> = store
        .list(None)
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    out.sort();
    out
}

#[tokio::test]
async fn a_manifest_is_verified_and_a_bad_one_is_removed() {
    let store = Arc::new(InMemory::new());
    let tier = tier(&store);
    let good = Bytes::from_static(b"{\"schemaVersion\":2}");
    let digest = Digest::of(&good);
    let path = Path::from(format!("cache/blobs/sha256/{}", digest.hex()));
    store.put(&path, good.clone().into()).await.unwrap();
    assert_eq!(tier.small(&digest, 1024).await, Some(good));
    assert_eq!(tier.small(&digest, 4).await, None, "over the limit");

    store
        .put(&path, Bytes::from_static(b"tampered").into())
        .await
        .unwrap();
    tier.present.invalidate(&digest);
    assert_eq!(tier.small(&digest, 1024).await, None);
    assert!(keys(&store).await.is_empty(), "the bad object stays");
    let corrupt = tier.metrics.corrupt.with_label_values(&["manifest"]).get();
    assert_eq!(corrupt, 1);
}

#[tokio::test]
async fn write_behind_copies_small_and_multipart_objects_and_skips_what_is_there() {
    let store = Arc::new(InMemory::new());
    let tier = tier(&store);
    let local = Arc::new(MemoryStore::new(1 << 30));
    let small = Bytes::from(vec![7u8; 1000]);
    // Larger than one PUT: a multipart upload of three parts, copied into place.
    let large = Bytes::from(
        (0..20 * 1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    );
    for data in [&small, &large] {
        local.put(&Digest::of(data), data.clone()).await.unwrap();
    }
    for data in [&small, &large] {
        let outcome = upload::upload(&tier, local.as_ref(), &Digest::of(data)).await;
        assert_eq!(outcome, "uploaded");
    }
    let expected: Vec<String> = {
        let mut k: Vec<String> = [&small, &large]
            .iter()
            .map(|d| format!("cache/blobs/sha256/{}", Digest::of(d).hex()))
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&store).await, expected, "no staging key left behind");
    let back = store.get(&Path::from(expected[0].as_str())).await.unwrap();
    let back = back.bytes().await.unwrap();
    assert!(back == small || back == large);
    for data in [&small, &large] {
        let outcome = upload::upload(&tier, local.as_ref(), &Digest::of(data)).await;
        assert_eq!(outcome, "present");
    }
    // Evicted locally before its turn: nothing to write.
    let gone = Digest::of(b"never kept");
    assert_eq!(upload::upload(&tier, local.as_ref(), &gone).await, "gone");
}

#[tokio::test]
async fn a_second_writer_does_not_clobber_the_first() {
    let store = Arc::new(InMemory::new());
    let tier = tier(&store);
    let data = Bytes::from_static(b"layer");
    let digest = Digest::of(&data);
    let path = Path::from(format!("cache/blobs/sha256/{}", digest.hex()));
    store
        .put(&path, Bytes::from_static(b"first").into())
        .await
        .unwrap();
    let local = Arc::new(MemoryStore::new(1 << 20));
    local.put(&digest, data).await.unwrap();
    // The HEAD is skipped when the digest is not known present, so the conditional PUT decides.
    let obj = local.peek(&digest).await.unwrap().unwrap();
    let put = upload::put_whole(&tier, &path, obj, false).await;
    assert_eq!(put, Err(TierError::Exists));
    let kept = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&kept[..], b"first");
}

#[tokio::test]
async fn tag_answers_round_trip_with_their_freshness() {
    let store = Arc::new(InMemory::new());
    let tier = tier(&store);
    let key = TagKey {
        upstream: Arc::from("docker.io"),
        name: RepoName::parse("library/alpine").unwrap(),
        tag: Tag::parse("3.20").unwrap(),
        accept: AcceptSet::ALL,
    };
    let until = UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 60,
        );
    let answer = StoredAnswer {
        digest: Digest::of(b"index"),
        fresh_until: until,
    };
    let path = tier.tag_path(&key);
    store.put(&path, answer_body(&answer).into()).await.unwrap();
    assert_eq!(
        path.to_string(),
        format!(
            "cache/tags/docker.io/library/alpine/_tags/3.20/{:x}",
            AcceptSet::ALL.bits()
        )
    );
    let found = tier.tag_answers("docker.io", &key.name, &key.tag).await;
    assert_eq!(found, vec![(AcceptSet::ALL, answer)]);
    let other = Tag::parse("3.21").unwrap();
    assert!(
        tier.tag_answers("docker.io", &key.name, &other)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_blob_reads_from_any_offset_and_an_absent_one_is_not_held() {
    let store = Arc::new(InMemory::new());
    let tier = tier(&store);
    let data = Bytes::from_static(b"0123456789");
    let digest = Digest::of(&data);
    let origin = tier.origin();
    let absent = origin.fetch(&digest, 0).await.err().unwrap();
    assert!(matches!(
        absent.kind,
        crate::origin::OriginErrorKind::NotHeld
    ));
    let path = Path::from(format!("cache/blobs/sha256/{}", digest.hex()));
    store.put(&path, data.into()).await.unwrap();
    let body = origin.fetch(&digest, 4).await.unwrap();
    assert_eq!(body.len, Some(10));
    let got: Vec<Bytes> = body.chunks.map(|c| c.unwrap()).collect().await;
    assert_eq!(&got.concat()[..], b"456789");
}

#[tokio::test]
async fn a_rejected_blob_is_not_read_again_until_the_right_bytes_are_written_over_it() {
    let store = Arc::new(InMemory::new());
    let tier = tier(&store);
    let data = Bytes::from_static(b"the right bytes");
    let digest = Digest::of(&data);
    let path = Path::from(format!("cache/blobs/sha256/{}", digest.hex()));
    store
        .put(&path, Bytes::from_static(b"the wrong bytes").into())
        .await
        .unwrap();
    let origin = tier.origin();
    assert!(origin.fetch(&digest, 0).await.is_ok());
    // The fill found a mismatch; the removal is queued (no write-behind thread runs here).
    origin.rejected(&digest);
    let skipped = origin.fetch(&digest, 0).await.err().unwrap();
    assert!(matches!(
        skipped.kind,
        crate::origin::OriginErrorKind::NotHeld
    ));
    // A fill from upstream kept the right bytes: they replace the bad copy, present or not.
    let local = Arc::new(MemoryStore::new(1 << 20));
    local.put(&digest, data.clone()).await.unwrap();
    assert_eq!(
        upload::upload(&tier, local.as_ref(), &digest).await,
        "uploaded"
    );
    let kept = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(kept, data);
    assert!(
        origin.fetch(&digest, 0).await.is_ok(),
        "read again once written anew"
    );
}

#[tokio::test]
async fn the_sweep_removes_what_was_written_before_max_age_and_keeps_the_rest() {
    let store = Arc::new(InMemory::new());
    let tier = tier(&store);
    let blob = Path::from(format!("cache/blobs/sha256/{}", Digest::of(b"x").hex()));
    let tag = Path::from("cache/tags/docker.io/library/a/_tags/1/7");
    let outside = Path::from("elsewhere/keep");
    for path in [&blob, &tag, &outside] {
        store
            .put(path, Bytes::from_static(b"x").into())
            .await
            .unwrap();
    }
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    assert_eq!(
        sweep::sweep(&tier, day, now).await,
        0,
        "nothing is a day old"
    );
    assert_eq!(sweep::sweep(&tier, day, now + 2 * day).await, 2);
    assert_eq!(keys(&store).await, vec!["elsewhere/keep".to_string()]);
    assert_eq!(sweep::interval(day), Duration::from_secs(3600));
    assert_eq!(
        sweep::interval(Duration::from_secs(10)),
        Duration::from_secs(60)
    );
}
