//! The cloud node's integration tests in one binary, so arrow, parquet and
//! object_store are linked once: the commit protocol (`commit`), three nodes through chaos (`cluster`), real processes end
//! to end (`e2e`), two owners of one shard (`fencing`), the model registry (`models`), the schema registry (`registry`) and the rollup job (`rollup`).
//! Run one group with `cargo test -p fleetline-cloud --test it e2e::`.

mod cluster;
mod commit;
mod e2e;
mod fencing;
mod models;
mod registry;
mod rollup;

/// A node's HTTP state for tests of its REST API: a single node with every
/// role, write token `tok`, read token `read-only`, registries on `store`.
async fn test_ops(
    store: fleetline_cloud::lake::store::Store,
    models: std::sync::Arc<fleetline_cloud::inference::ModelRegistry>,
) -> fleetline_cloud::http::Ops {
    use std::sync::Arc;
    fleetline_cloud::http::Ops {
        rollup: Arc::new(fleetline_cloud::jobs::rollup::RollupJob::new(store.clone(), &Default::default())),
        registry: Arc::new(fleetline_cloud::registry::Registry::open(store.clone()).await.expect("schema registry")),
        store,
        node_id: "t".into(),
        shard_count: 1,
        stats: Arc::default(),
        shards: fleetline_cloud::shard::ShardDirectory::new(0),
        cluster: Arc::new(fleetline_cloud::cluster::ClusterState::new(
            fleetline_cloud::cluster::Member {
                id: "t".into(),
                http: String::new(),
                roles: fleetline_cloud::cluster::Role::ALL.into(),
                version: "1".into(),
            },
            fleetline_cloud::cluster::Mode::Single,
        )),
        metrics: None,
        token: Some("tok".into()),
        read_token: Some("read-only".into()),
        models,
    }
}
