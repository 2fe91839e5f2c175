use super::*;
use std::time::Duration;
async fn read_all(obj: Object) -> Vec<u8> {
    let len = obj.len as usize;
    let (bytes, _) = obj.reader.read(0, len, BytesMut::new()).await.unwrap();
    bytes.to_vec()
}

#[tokio::test]
async fn commit_makes_verified_object_visible() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
    let data = b"hello layer".to_vec();
    let digest = Digest::of(&data);
    assert!(store.open(&digest).await.unwrap().is_none());
    store.put(&digest, data.clone().into()).await.unwrap();
    let obj = store.open(&digest).await.unwrap().unwrap();
    assert_eq!(obj.len, data.len() as u64);
    assert_eq!(read_all(obj).await, data);
    assert_eq!(
        (store.usage().bytes, store.usage().objects),
        (data.len() as u64, 1)
    );
}

#[tokio::test]
async fn mismatch_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
    let digest = Digest::of(b"expected");
    let err = store
        .put(&digest, Bytes::from_static(b"something else"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }));
    assert!(store.open(&digest).await.unwrap().is_none());
    store.wait_for_unlinks();
    assert!(!store.path_of(&digest).exists());
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[tokio::test]
async fn readers_follow_growth_and_survive_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
    let digest = Digest::of(b"abcdef");
    let mut ingest = store.ingest(&digest).await.unwrap();
    let reader = ingest.reader().unwrap();
    ingest.write(b"abc").unwrap();
    let (bytes, _) = reader.read(0, 3, BytesMut::new()).await.unwrap();
    assert_eq!(&bytes[..], b"abc");
    ingest.write(b"def").unwrap();
    let proof = ingest.verify().unwrap();
    ingest.commit(proof).await.unwrap();
    let (bytes, _) = reader.read(3, 3, BytesMut::new()).await.unwrap();
    assert_eq!(&bytes[..], b"def");
}

#[tokio::test]
async fn a_discarded_ingest_still_verifies_but_never_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 10).unwrap();
    let kept = put_all(&store, &[&[1; 4]]).await;
    let digest = Digest::of(b"abcdef");
    let mut ingest = store.ingest(&digest).await.unwrap();
    ingest.reserve(6).await.unwrap();
    ingest.write(b"abc").unwrap();
    ingest.discard();
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    // Had the discard kept its reservation, this one would evict the kept object.
    store
        .ingest(&digest)
        .await
        .unwrap()
        .reserve(6)
        .await
        .unwrap();
    assert!(
        store.path_of(&kept[0]).exists(),
        "the reservation was not given back"
    );
    ingest.write(b"def").unwrap();
    assert_eq!(ingest.written(), 3, "a discarded ingest wrote on");
    let proof = ingest.verify().unwrap();
    assert_eq!(proof.len(), 6, "verified what was passed, not written");
    assert!(ingest.commit(proof).await.is_err());
    assert!(store.open(&digest).await.unwrap().is_none());
}

#[tokio::test]
async fn restart_rebuilds_index_and_wipes_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let digest = Digest::of(b"kept");
    {
        let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
        store
            .put(&digest, Bytes::from_static(b"kept"))
            .await
            .unwrap();
        let abandoned = store.ingest(&Digest::of(b"lost")).await.unwrap();
        std::mem::forget(abandoned); // as if the process died mid-fill
    }
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
    fs::write(dir.path().join("objects/sha256/zz-not-a-digest"), b"x").unwrap();
    let store = DiskStore::open(dir.path(), u64::MAX).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    assert_eq!(store.stat(&digest).await.unwrap(), Some(4));
    assert_eq!((store.usage().bytes, store.usage().objects), (4, 1));
}

/// The digests the store lists, least recently served first.
async fn listed(store: &DiskStore) -> Vec<Digest> {
    let listed = store.list().await.unwrap();
    listed.into_iter().map(|(d, _)| d).collect()
}

async fn put_all(store: &DiskStore, blobs: &[&[u8]]) -> Vec<Digest> {
    let mut digests = Vec::new();
    for blob in blobs {
        let digest = Digest::of(blob);
        store
            .put(&digest, Bytes::copy_from_slice(blob))
            .await
            .unwrap();
        digests.push(digest);
    }
    digests
}

#[tokio::test]
async fn eviction_deletes_the_least_recently_served_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 30).unwrap();
    let d = put_all(&store, &[&[1; 10], &[2; 10], &[3; 10]]).await;
    store.open(&d[0]).await.unwrap().unwrap();
    let reader = store.open(&d[1]).await.unwrap().unwrap();
    put_all(&store, &[&[4; 10]]).await;
    store.wait_for_unlinks();
    assert!(!store.path_of(&d[2]).exists());
    assert!(store.path_of(&d[0]).exists());
    assert_eq!(store.usage().bytes, 30);
    // A reader of an object evicted under it still gets all its bytes.
    put_all(&store, &[&[5; 10], &[6; 10]]).await;
    store.wait_for_unlinks();
    assert!(!store.path_of(&d[1]).exists());
    assert_eq!(read_all(reader).await, vec![2; 10]);
    assert_eq!(store.usage().evicted_objects, 3);
}

#[tokio::test]
async fn eviction_order_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = {
        let store = DiskStore::open(dir.path(), 100).unwrap();
        let d = put_all(&store, &[&[1; 10], &[2; 10], &[3; 10]]).await;
        store.open(&d[0]).await.unwrap();
        store.reconciled().await;
        assert!(store.save_order().unwrap());
        assert!(!store.save_order().unwrap(), "nothing changed since");
        d
    };
    // Committed after the last save: newer than everything the save knows.
    {
        let store = DiskStore::open(dir.path(), 100).unwrap();
        put_all(&store, &[&[4; 10]]).await;
    }
    let store = DiskStore::open(dir.path(), 100).unwrap();
    let order = listed(&store).await;
    assert_eq!(order[..3], [d[1].clone(), d[2].clone(), d[0].clone()]);
    assert_eq!(order[3], Digest::of(&[4; 10]));
}

#[tokio::test]
async fn the_order_is_not_saved_before_the_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = {
        let store = DiskStore::open(dir.path(), 100).unwrap();
        let d = put_all(&store, &[&[1; 10], &[2; 10]]).await;
        store.reconciled().await;
        assert!(store.save_order().unwrap());
        d
    };
    // A start that has not listed the files yet: the index has the saved two; a third
    // committed now must not be saved as the only one newer than those.
    let store = DiskStore::open_unchecked(dir.path(), 100, true).unwrap();
    store.open(&d[0]).await.unwrap();
    put_all(&store, &[&[3; 10]]).await;
    assert!(!store.usage().index_checked);
    assert!(!store.save_order().unwrap(), "saved before the check");
    let saved = store.read_order().unwrap();
    assert_eq!(saved, vec![(d[0].clone(), 10), (d[1].clone(), 10)]);
}

#[tokio::test]
async fn a_smaller_limit_evicts_at_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = DiskStore::open(dir.path(), 100).unwrap();
        put_all(&store, &[&[1; 10], &[2; 10], &[3; 10]]).await;
        // Without a saved order the next start goes by mtime, and commits this close
        // together can share a clock tick (then the tie is broken by digest).
        store.reconciled().await;
        store.save_order().unwrap();
    }
    let store = DiskStore::open(dir.path(), 20).unwrap();
    assert_eq!((store.usage().bytes, store.usage().objects), (20, 2));
    store.wait_for_unlinks();
    assert!(!store.path_of(&Digest::of(&[1; 10])).exists());
}

#[tokio::test]
async fn an_object_larger_than_the_cache_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 10).unwrap();
    let kept = put_all(&store, &[&[1; 5]]).await;
    let big = vec![7u8; 11];
    let digest = Digest::of(&big);
    let mut ingest = store.ingest(&digest).await.unwrap();
    assert!(matches!(
        ingest.reserve(11).await,
        Err(StoreError::TooLarge { len: 11, max: 10 })
    ));
    let err = store.put(&digest, big.into()).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }));
    store.wait_for_unlinks();
    assert!(!store.path_of(&digest).exists());
    assert!(store.path_of(&kept[0]).exists(), "nothing evicted for it");
}

#[tokio::test]
async fn pinned_objects_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 20).unwrap();
    let d = put_all(&store, &[&[1; 10], &[2; 10]]).await;
    store.set_pins([d[0].clone()].into());
    put_all(&store, &[&[3; 10]]).await;
    assert!(store.path_of(&d[0]).exists());
    assert!(!store.path_of(&d[1]).exists());
    assert_eq!(store.usage().pinned_bytes, 10);
}

#[tokio::test]
async fn remove_deletes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 100).unwrap();
    let d = put_all(&store, &[&[1; 10]]).await;
    assert_eq!(store.remove(&d[0]).await.unwrap(), Some(10));
    assert_eq!(store.remove(&d[0]).await.unwrap(), None);
    store.wait_for_unlinks();
    assert!(!store.path_of(&d[0]).exists());
    assert_eq!(store.usage().bytes, 0);
}

// The lock is held across the wait on purpose: it is what the unlinks must not wait for.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_is_made_without_waiting_for_the_unlinks() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 30).unwrap();
    let d = put_all(&store, &[&[1; 10], &[2; 10], &[3; 10]]).await;
    let big = vec![9u8; 25];
    let mut ingest = store.ingest(&Digest::of(&big)).await.unwrap();
    store.reconciled().await;
    // While the files cannot be unlinked (their names are locked), the room is still made.
    let names = store.shared.namespace();
    let mut reserve = tokio::spawn(async move { ingest.reserve(25).await });
    let reserved = tokio::time::timeout(Duration::from_secs(20), &mut reserve).await;
    let still_there = d.iter().all(|d| store.path_of(d).exists());
    drop(names);
    reserved
        .expect("the reservation waited for the unlinks")
        .unwrap()
        .unwrap();
    assert!(still_there);
    assert_eq!(store.usage().evicted_objects, 3, "counted when evicted");
    assert_eq!(store.usage().objects, 0);
    store.wait_for_unlinks();
    assert!(d.iter().all(|d| !store.path_of(d).exists()));
}

#[tokio::test]
async fn a_file_waiting_to_be_unlinked_is_not_taken_for_a_cached_object() {
    let dir = tempfile::tempdir().unwrap();
    let d = {
        let store = DiskStore::open(dir.path(), 100).unwrap();
        put_all(&store, &[&[1; 10], &[2; 10]]).await
    };
    // No saved order: both files are unknown to the index until they are looked at.
    let store = DiskStore::open_unchecked(dir.path(), 100, true).unwrap();
    // As if evicted and not yet unlinked (the deleter is not told, so it stays so).
    let evicted = vec![(d[0].clone(), 10)];
    store.shared.deleter.pending.lock().unwrap().add(&evicted);
    assert_eq!(store.stat(&d[0]).await.unwrap(), None, "a lookup took it");
    Reconcile::run(&store.shared).unwrap();
    assert_eq!(store.shared.index.order(), vec![(d[1].clone(), 10)]);
}

#[tokio::test]
async fn a_restart_serves_from_the_saved_order_while_the_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, gone, unlisted) = {
        let store = DiskStore::open(dir.path(), 100).unwrap();
        let d = put_all(&store, &[&[1; 10], &[2; 10]]).await;
        store.reconciled().await;
        store.save_order().unwrap();
        let unlisted = put_all(&store, &[&[3; 10]]).await.remove(0);
        (d[0].clone(), d[1].clone(), unlisted)
    };
    fs::remove_file(DiskStore::open(dir.path(), 100).unwrap().path_of(&gone)).unwrap();
    // As right after a start, before the files are listed: the index has the saved order.
    let store = DiskStore::open_unchecked(dir.path(), 100, true).unwrap();
    assert_eq!(store.usage().objects, 2);
    assert_eq!(
        store.stat(&unlisted).await.unwrap(),
        Some(10),
        "the file was not looked at"
    );
    assert!(store.open(&kept).await.unwrap().is_some());
    assert!(store.open(&gone).await.unwrap().is_none());
    Reconcile::start(store.shared.clone()).unwrap();
    store.reconciled().await;
    let order = listed(&store).await;
    assert_eq!(order, vec![unlisted.clone(), kept.clone()]);
    // Complete now: a file the index does not know is not looked for.
    let stray = Digest::of(&[4; 10]);
    let path = store.path_of(&stray);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, [4; 10]).unwrap();
    assert_eq!(store.stat(&stray).await.unwrap(), None);
}
