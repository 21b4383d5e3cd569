//! The metadata group on an in-memory network (openraft's test pattern): no sockets, no
//! sleeps; every wait is on openraft's metrics with a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;

use openraft::Vote;
use openraft::raft::VoteRequest;

use super::network::{BoxFuture, answer};
use super::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// Delivers RPCs between the clusters registered in it; a node marked down neither sends nor
/// receives.
#[derive(Debug, Default)]
struct Router {
    nodes: Mutex<BTreeMap<u64, Cluster>>,
    down: Mutex<BTreeSet<u64>>,
}

#[derive(Debug)]
struct NodeTransport {
    from: u64,
    router: Arc<Router>,
}

impl Transport for NodeTransport {
    fn call(
        &self,
        target: u64,
        node: &BasicNode,
        rpc: Rpc,
    ) -> BoxFuture<'static, Result<RpcReply, TransportError>> {
        let down = self.router.down.lock().unwrap();
        let peer = if down.contains(&self.from) || down.contains(&target) {
            None
        } else {
            self.router.nodes.lock().unwrap().get(&target).cloned()
        };
        let addr = node.addr.clone();
        Box::pin(async move {
            match peer {
                Some(c) => Ok(answer(c.raft(), Some(&c), rpc).await),
                None => Err(TransportError::Io {
                    addr,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                }),
            }
        })
    }
}

struct TestCluster {
    router: Arc<Router>,
    dirs: BTreeMap<u64, tempfile::TempDir>,
}

impl TestCluster {
    fn new(ids: &[u64]) -> Self {
        Self {
            router: Arc::default(),
            dirs: ids
                .iter()
                .map(|id| (*id, tempfile::tempdir().unwrap()))
                .collect(),
        }
    }

    fn peers(&self) -> BTreeMap<u64, BasicNode> {
        self.dirs
            .keys()
            .map(|id| (*id, BasicNode::new(format!("node-{id}"))))
            .collect()
    }

    /// Starts (or restarts, from its files) node `id`.
    async fn start(&self, id: u64) -> Cluster {
        let c = self.start_cut_off(id).await;
        self.router.down.lock().unwrap().remove(&id);
        c
    }

    /// Starts node `id` cut off from the others.
    async fn start_cut_off(&self, id: u64) -> Cluster {
        self.start_cut_off_with(id, None).await
    }

    /// Starts node `id` with `local` replicas (their storage and groups), connected.
    async fn start_local(&self, id: u64, local: super::state::LocalReplicas) -> Cluster {
        let c = self.start_cut_off_with(id, Some(local)).await;
        self.router.down.lock().unwrap().remove(&id);
        c
    }

    async fn start_cut_off_with(
        &self,
        id: u64,
        local: Option<super::state::LocalReplicas>,
    ) -> Cluster {
        self.router.down.lock().unwrap().insert(id);
        let transport = Arc::new(NodeTransport {
            from: id,
            router: Arc::clone(&self.router),
        });
        let c = Cluster::open(
            id,
            &self.dirs[&id].path().join("cluster"),
            raft_config(),
            transport,
            local,
        )
        .await
        .unwrap();
        self.router.nodes.lock().unwrap().insert(id, c.clone());
        c
    }

    /// Stops node `id` and cuts it off.
    async fn stop(&self, id: u64) {
        self.router.down.lock().unwrap().insert(id);
        let c = self.router.nodes.lock().unwrap().remove(&id).unwrap();
        c.shutdown().await;
    }

    async fn leader_among(&self, nodes: &[&Cluster]) -> u64 {
        let m = nodes[0]
            .raft()
            .wait(Some(DEADLINE))
            .metrics(
                |m| {
                    m.current_leader
                        .is_some_and(|l| nodes.iter().any(|n| n.node_id() == l))
                },
                "a leader among the live nodes",
            )
            .await
            .unwrap();
        m.current_leader.unwrap()
    }
}

async fn wait_applied(c: &Cluster, index: u64) {
    c.raft()
        .wait(Some(DEADLINE))
        .applied_index_at_least(Some(index), "applied")
        .await
        .unwrap();
}

fn create(name: &str, partitions: u32, rf: u32) -> Command {
    Command::CreateTopic {
        name: name.into(),
        partitions,
        replication_factor: rf,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_and_a_topic_created_through_a_follower_is_on_all() {
    let t = TestCluster::new(&[1, 2, 3]);
    let (a, b, c) = (t.start(1).await, t.start(2).await, t.start(3).await);
    a.bootstrap(t.peers()).await.unwrap();
    // Bootstrapping again (a restart of the first broker) changes nothing.
    a.bootstrap(t.peers()).await.unwrap();
    let nodes = [&a, &b, &c];
    let leader = t.leader_among(&nodes).await;
    let follower = nodes.iter().find(|n| n.node_id() != leader).unwrap();
    for n in nodes {
        n.register("127.0.0.1".into(), 9000 + n.node_id() as u16)
            .await;
    }
    assert_eq!(
        follower
            .write(create("orders", 6, 3))
            .await
            .unwrap()
            .applied,
        Applied::Created(true)
    );
    assert_eq!(
        follower
            .write(create("orders", 6, 3))
            .await
            .unwrap()
            .applied,
        Applied::Created(false)
    );
    let refused = follower.write(create("big", 1, 4)).await.unwrap();
    let Applied::Refused { code, message } = refused.applied else {
        panic!("RF 4 on 3 brokers must be refused");
    };
    assert_eq!(code, streambus_core::ErrorCode::INVALID_REQUEST.0);
    assert!(message.contains("replication factor 4"), "{message}");
    let index = refused.index;
    for n in nodes {
        wait_applied(n, index).await;
    }
    let m = a.metadata();
    assert_eq!(b.metadata(), m);
    assert_eq!(c.metadata(), m);
    assert_eq!(m.brokers.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(m.brokers[&2].port, 9002);
    let replicas: Vec<Vec<u32>> = m.topics["orders"]
        .partitions
        .iter()
        .map(|p| p.replicas.clone())
        .collect();
    assert_eq!(
        replicas,
        [
            vec![1, 2, 3],
            vec![2, 3, 1],
            vec![3, 1, 2],
            vec![1, 2, 3],
            vec![2, 3, 1],
            vec![3, 1, 2]
        ]
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_leader_gone_another_is_elected_and_writes_go_on() {
    let t = TestCluster::new(&[1, 2, 3]);
    let all = [t.start(1).await, t.start(2).await, t.start(3).await];
    all[0].bootstrap(t.peers()).await.unwrap();
    let refs: Vec<&Cluster> = all.iter().collect();
    let old = t.leader_among(&refs).await;
    all[0].write(create("before", 1, 0)).await.unwrap();
    t.stop(old).await;
    let rest: Vec<&Cluster> = all.iter().filter(|n| n.node_id() != old).collect();
    let new = t.leader_among(&rest).await;
    assert_ne!(new, old);
    // Through either survivor: the follower forwards to the new leader.
    let mut index = 0;
    for n in &rest {
        let name = format!("after-{}", n.node_id());
        let written = n.write(create(&name, 2, 0)).await.unwrap();
        assert_eq!(written.applied, Applied::Created(true));
        index = index.max(written.index);
    }
    for n in &rest {
        wait_applied(n, index).await;
        let names: Vec<String> = n.metadata().topics.keys().cloned().collect();
        let mut want = vec!["after-1", "after-2", "after-3", "before"];
        want.retain(|w| !w.ends_with(&format!("-{old}")));
        assert_eq!(
            names,
            want,
            "node {} old {old} new {new} index {index} metrics {:?}",
            n.node_id(),
            n.raft().metrics().borrow()
        );
    }
    for n in rest {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_from_its_stored_log_and_a_snapshot() {
    let t = TestCluster::new(&[1, 2, 3]);
    let (a, b) = (t.start(1).await, t.start(2).await);
    let c = t.start(3).await;
    a.bootstrap(t.peers()).await.unwrap();
    t.leader_among(&[&a, &b, &c]).await;
    let index_one = a.write(create("one", 1, 0)).await.unwrap().index;
    wait_applied(&c, index_one).await;
    t.stop(3).await;
    drop(c);
    // While node 3 is down: more writes, and a snapshot on the others.
    a.write(create("two", 3, 2)).await.unwrap();
    let index = a
        .write(Command::DeleteTopic { name: "one".into() })
        .await
        .unwrap()
        .index;
    wait_applied(&b, index).await;
    b.raft().trigger().snapshot().await.unwrap();
    b.raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= index),
            "a snapshot of everything applied",
        )
        .await
        .unwrap();
    // Restarted from its own files, still cut off: it applies its stored log again.
    let c = t.start_cut_off(3).await;
    wait_applied(&c, index_one).await;
    assert_eq!(
        c.metadata().topics.keys().cloned().collect::<Vec<_>>(),
        ["one"]
    );
    // Connected: it catches up with what it missed.
    t.router.down.lock().unwrap().remove(&3);
    wait_applied(&c, index).await;
    assert_eq!(c.metadata(), a.metadata());
    assert_eq!(
        c.metadata().topics.keys().cloned().collect::<Vec<_>>(),
        ["two"]
    );
    // Node 2 restarted reads its snapshot back.
    t.stop(2).await;
    drop(b);
    let b = t.start(2).await;
    assert_eq!(b.metadata(), a.metadata());
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// A broker that was down while a topic was deleted, and catches up by installing a metadata
/// snapshot (the others purged their logs), deletes its local replicas of that topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_installs_a_metadata_snapshot_deletes_the_topics_it_no_longer_has() {
    use super::state::LocalReplicas;
    let t = TestCluster::new(&[1, 2, 3]);
    let (a, b) = (t.start(1).await, t.start(2).await);
    let mut cfg = StorageConfig::new(t.dirs[&3].path().join("data"));
    cfg.fsync = FsyncPolicy::Never;
    let storage = Arc::new(Storage::open(cfg).unwrap());
    let c = t
        .start_local(3, LocalReplicas::new(3, Arc::clone(&storage)))
        .await;
    a.bootstrap(t.peers()).await.unwrap();
    t.leader_among(&[&a, &b, &c]).await;
    let created = a.write(create("one", 1, 3)).await.unwrap().index;
    wait_applied(&c, created).await;
    assert_eq!(storage.list_topics(), [("one".to_owned(), 1)]);
    // Node 3 stops (its partition group first); meanwhile "one" is deleted, "two" created,
    // and the others snapshot and purge their logs.
    for (_, raft) in c.replicas().all() {
        raft.shutdown().await.unwrap();
    }
    t.stop(3).await;
    drop(c);
    a.write(Command::DeleteTopic { name: "one".into() })
        .await
        .unwrap();
    let index = a.write(create("two", 1, 2)).await.unwrap().index;
    for n in [&a, &b] {
        wait_applied(n, index).await;
        n.raft().trigger().snapshot().await.unwrap();
        n.raft()
            .wait(Some(DEADLINE))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= index),
                "a snapshot",
            )
            .await
            .unwrap();
        n.raft().trigger().purge_log(index).await.unwrap();
        n.raft()
            .wait(Some(DEADLINE))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index >= index),
                "the log purged",
            )
            .await
            .unwrap();
    }
    // Back, it installs the snapshot: "one" is gone from its storage too.
    let c = t
        .start_local(3, LocalReplicas::new(3, Arc::clone(&storage)))
        .await;
    wait_applied(&c, index).await;
    assert!(
        c.raft()
            .metrics()
            .borrow()
            .snapshot
            .is_some_and(|s| s.index >= index),
        "caught up by snapshot"
    );
    assert_eq!(
        c.metadata().topics.keys().cloned().collect::<Vec<_>>(),
        ["two"]
    );
    assert!(
        storage.list_topics().iter().all(|(t, _)| t != "one"),
        "{:?}",
        storage.list_topics()
    );
    for (_, raft) in c.replicas().all() {
        raft.shutdown().await.unwrap();
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_link_refuses_another_version_with_a_message_naming_both() {
    use super::network::{Hello, LINK_NAME, LINK_VERSION, TcpTransport, connect, serve};
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::open(7, dir.path(), raft_config(), TcpTransport::new(7), None)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(serve(listener, c.clone(), None));
    let hello = |link: &str, version| Hello {
        link: link.into(),
        version,
        from: 1,
    };
    connect(&addr, &hello(LINK_NAME, LINK_VERSION), None)
        .await
        .unwrap();
    // Version 1 (the metadata group alone, before partition replication) and version 2
    // (JSON after the handshake) are refused.
    for old in [1, 2] {
        let e = connect(&addr, &hello(LINK_NAME, old), None)
            .await
            .err()
            .expect("refused");
        assert_eq!(
            e.to_string(),
            format!(
                "{addr} refused the cluster link: cluster link version {old} is not supported: broker 7 speaks version 3"
            )
        );
    }
    let e = connect(&addr, &hello("kafka", 1), None)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        e.to_string(),
        format!("{addr} refused the cluster link: \"kafka\" is not the StreamBus cluster link")
    );
    server.abort();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leader_is_the_preferred_leader_with_its_registered_address() {
    let t = TestCluster::new(&[1, 2, 3]);
    let (a, b, c) = (t.start(1).await, t.start(2).await, t.start(3).await);
    a.bootstrap(t.peers()).await.unwrap();
    // Brokers 1 and 2 register their client addresses; broker 3 not (yet).
    a.register("127.0.0.1".into(), 9001).await;
    b.register("127.0.0.1".into(), 9002).await;
    let index = a.write(create("orders", 3, 2)).await.unwrap().index;
    wait_applied(&a, index).await;
    let at = |port| {
        Some(BrokerAddress {
            host: "127.0.0.1".into(),
            port,
        })
    };
    assert_eq!(a.partition_leader("orders", 0), PartitionLeader::Here);
    assert_eq!(
        a.partition_leader("orders", 1),
        PartitionLeader::Elsewhere {
            leader: 2,
            address: at(9002)
        }
    );
    assert_eq!(
        a.partition_leader("orders", 2),
        PartitionLeader::Elsewhere {
            leader: 3,
            address: None
        }
    );
    // What the group does not know is left to the storage (TopicNotFound, PartitionNotFound).
    assert_eq!(a.partition_leader("orders", 3), PartitionLeader::Unknown);
    assert_eq!(a.partition_leader("nowhere", 0), PartitionLeader::Unknown);
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}

/// Waits until `c` counts `n` voters in the group.
async fn wait_voters(c: &Cluster, n: usize) {
    c.raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.membership_config.membership().voter_ids().count() == n,
            "the voters",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_first_start_the_lowest_id_bootstraps_through_join_and_the_others_join_it() {
    let t = TestCluster::new(&[1, 2, 3]);
    let (a, b, c) = (t.start(1).await, t.start(2).await, t.start(3).await);
    let peers = t.peers();
    let (ra, rb, rc) = tokio::join!(
        a.join(&peers, true),
        b.join(&peers, false),
        c.join(&peers, false)
    );
    ra.unwrap();
    rb.unwrap();
    rc.unwrap();
    for n in [&a, &b, &c] {
        wait_voters(n, 3).await;
        assert!(n.is_voter());
    }
    assert_eq!(
        a.write(create("t", 1, 3)).await.unwrap().applied,
        Applied::Created(true)
    );
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_broker_joins_as_a_voter_and_new_topics_are_placed_on_it() {
    let t = TestCluster::new(&[1, 2, 3, 4]);
    let three: BTreeMap<u64, BasicNode> =
        t.peers().into_iter().filter(|(id, _)| *id != 4).collect();
    let (a, b, c) = (t.start(1).await, t.start(2).await, t.start(3).await);
    a.bootstrap(three).await.unwrap();
    t.leader_among(&[&a, &b, &c]).await;
    a.write(create("before", 3, 3)).await.unwrap();
    let d = t.start(4).await;
    assert!(!d.is_voter());
    // Broker 4 knows every peer; the first three were started without it.
    d.join(&t.peers(), false).await.unwrap();
    for n in [&a, &b, &c, &d] {
        wait_voters(n, 4).await;
    }
    assert!(d.is_voter());
    // Joining again is answered at once.
    d.join(&t.peers(), false).await.unwrap();
    // Through a follower of the grown group; placed over the four brokers.
    let written = b.write(create("after", 4, 2)).await.unwrap();
    assert_eq!(written.applied, Applied::Created(true));
    wait_applied(&d, written.index).await;
    wait_applied(&a, written.index).await;
    let m = d.metadata();
    let replicas = |topic: &str| -> Vec<Vec<u32>> {
        m.topics[topic]
            .partitions
            .iter()
            .map(|p| p.replicas.clone())
            .collect()
    };
    assert_eq!(replicas("before"), [[1, 2, 3], [2, 3, 1], [3, 1, 2]]);
    assert_eq!(replicas("after"), [[4, 1], [1, 2], [2, 3], [3, 4]]);
    assert_eq!(m, a.metadata());
    // Another broker claiming id 4 at another cluster address is refused, with why.
    let leader = t.leader_among(&[&a, &b, &c, &d]).await;
    let l = [&a, &b, &c, &d]
        .into_iter()
        .find(|n| n.node_id() == leader)
        .unwrap();
    let refused = l.join_here(4, "elsewhere".into()).await.unwrap_err();
    assert_eq!(
        refused.to_string(),
        "broker 4 is a member of the cluster with its cluster listener at node-4, not elsewhere: changing a broker's --cluster-listen address is not supported"
    );
    for n in [a, b, c, d] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_lowest_id_broker_rejoins_the_live_group_instead_of_starting_a_second_one() {
    let t = TestCluster::new(&[1, 2, 3]);
    let (a, b, c) = (t.start(1).await, t.start(2).await, t.start(3).await);
    a.bootstrap(t.peers()).await.unwrap();
    t.leader_among(&[&a, &b, &c]).await;
    for n in [&a, &b, &c] {
        n.register("127.0.0.1".into(), 9000 + n.node_id() as u16)
            .await;
    }
    let index = b.write(create("kept", 2, 3)).await.unwrap().index;
    wait_applied(&c, index).await;
    let config_before = b
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .log_id()
        .to_owned();
    t.stop(1).await;
    drop(a);
    std::fs::remove_dir_all(t.dirs[&1].path().join("cluster")).unwrap();
    let a = t.start(1).await;
    assert!(a.started_blank());
    // While it joins it grants no vote (it may have voted in this term before the wipe).
    a.start_joining();
    let asked = VoteRequest::new(Vote::new(99, 2), None);
    let RpcReply::Vote(Ok(refused)) = answer(a.raft(), Some(&a), Rpc::Vote(asked)).await else {
        panic!("a vote request is answered with a vote response");
    };
    assert!(!refused.vote_granted);
    // May bootstrap (lowest id), but brokers 2 and 3 belong to a group: it joins that one.
    a.join(&t.peers(), true).await.unwrap();
    wait_voters(&a, 3).await;
    // Having registered before, it was demoted to a learner and promoted again (it may have
    // forgotten a vote): new membership configs, the same three voters.
    let before = config_before.map(|l| l.index);
    let after = b
        .raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.membership_config.log_id().map(|l| l.index) > before,
            "a new membership config",
        )
        .await
        .unwrap()
        .membership_config;
    assert_eq!(
        after.membership().voter_ids().collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let index = c.write(create("later", 1, 3)).await.unwrap().index;
    wait_applied(&a, index).await;
    wait_applied(&b, index).await;
    assert_eq!(
        a.metadata().topics.keys().cloned().collect::<Vec<_>>(),
        ["kept", "later"]
    );
    assert_eq!(a.metadata(), b.metadata());
    // One group: every broker sees the same leader and term.
    let leader = t.leader_among(&[&a, &b, &c]).await;
    for n in [&a, &b, &c] {
        n.raft()
            .wait(Some(DEADLINE))
            .current_leader(leader, "the same leader on every node")
            .await
            .unwrap();
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

// ---- Partition groups (partition replication) on the same in-memory network ----

use super::replica::{self, Batch, BatchApplied, PartitionId, PartitionRaft};
use crate::storage::{FsyncPolicy, RaftEntry, Storage, StorageConfig, TopicConfig};

fn orders() -> PartitionId {
    PartitionId {
        topic: "orders".into(),
        partition: 0,
    }
}

/// One broker's replica of `orders`/0: its metadata-group member (which carries the link),
/// its storage and its partition group.
struct Replica {
    id: u64,
    storage: Arc<Storage>,
    raft: PartitionRaft,
}

impl Replica {
    /// The entries kept (after the last purged).
    fn entries(&self) -> Vec<RaftEntry> {
        let st = self.storage.raft_log_state("orders", 0).unwrap();
        let from = st.last_purged.map_or(0, |p| p.index + 1);
        self.storage
            .raft_entries("orders", 0, from, u64::MAX)
            .unwrap()
    }

    /// `(log start, high-water mark)` as GetOffset sees it.
    fn offsets(&self) -> (i64, i64) {
        self.storage.offsets("orders", 0).unwrap()
    }

    /// The values a consumer reads from `from` on.
    fn values(&self, from: i64) -> Vec<String> {
        let f = self
            .storage
            .fetch("orders", 0, from, 1 << 20, u32::MAX)
            .unwrap();
        streambus_core::MessageSet::new_checked(f.count, &f.records)
            .unwrap()
            .iter()
            .map(|m| String::from_utf8(m.value.to_vec()).unwrap())
            .collect()
    }

    /// The Offset field of every record readable from 0.
    fn record_offsets(&self) -> Vec<i64> {
        let f = self
            .storage
            .fetch("orders", 0, 0, 1 << 20, u32::MAX)
            .unwrap();
        streambus_core::MessageSet::new_checked(f.count, &f.records)
            .unwrap()
            .iter()
            .map(|m| m.offset)
            .collect()
    }

    /// The partition directory's segment files, by name.
    fn segment_files(&self) -> BTreeMap<String, Vec<u8>> {
        let dir = self.storage.partition_dir("orders", 0).unwrap();
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log" || x == "idx"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect()
    }

    async fn wait_applied(&self, index: u64) {
        self.raft
            .wait(Some(DEADLINE))
            .applied_index_at_least(Some(index), "partition entries applied")
            .await
            .unwrap();
    }
}

fn partition_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        // Snapshots only when a test asks, and then the whole log before it is purged.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..(*replica::partition_raft_config()).clone()
    };
    Arc::new(config.validate().unwrap())
}

impl TestCluster {
    /// Starts (or restarts, from its files) node `id` with its replica of `orders`/0.
    async fn start_replica(&self, id: u64) -> (Cluster, Replica) {
        self.start_replica_with(id, partition_config(), 60).await
    }

    /// [`start_replica`](Self::start_replica) with these group settings and segment size.
    async fn start_replica_with(
        &self,
        id: u64,
        config: Arc<openraft::Config>,
        segment_bytes: u64,
    ) -> (Cluster, Replica) {
        self.start_replica_opts(id, config, segment_bytes, TopicConfig::default())
            .await
    }

    /// [`start_replica_with`](Self::start_replica_with), the topic created with `topic`'s
    /// settings (retention); the storage's retention runs go through the partition group.
    async fn start_replica_opts(
        &self,
        id: u64,
        config: Arc<openraft::Config>,
        segment_bytes: u64,
        topic: TopicConfig,
    ) -> (Cluster, Replica) {
        let cluster = self.start(id).await;
        self.open_replica(cluster, id, config, segment_bytes, topic)
            .await
    }

    /// Opens node `id`'s replica of `orders`/0 (the topic with `topic`'s settings) on its
    /// started `cluster`.
    async fn open_replica(
        &self,
        cluster: Cluster,
        id: u64,
        config: Arc<openraft::Config>,
        segment_bytes: u64,
        topic: TopicConfig,
    ) -> (Cluster, Replica) {
        let mut cfg = StorageConfig::new(self.dirs[&id].path().join("data"));
        cfg.fsync = FsyncPolicy::Never;
        cfg.segment_bytes = segment_bytes;
        cfg.retention_check_interval = Duration::ZERO;
        // Only the topic's retention applies (the test batches are stamped in 1970).
        cfg.retention_age = None;
        let storage = Arc::new(Storage::open(cfg).unwrap());
        storage.create_raft_topic("orders", 1, topic).unwrap();
        cluster.retain_through_groups(&storage);
        let transport = Arc::new(NodeTransport {
            from: id,
            router: Arc::clone(&self.router),
        });
        let raft = replica::open_group(id, Arc::clone(&storage), orders(), config, transport, None)
            .await
            .unwrap();
        cluster.replicas().insert(orders(), raft.clone());
        (cluster, Replica { id, storage, raft })
    }

    /// Starts replicas 1, 2 and 3 of the partition, replica 1 initialising the group.
    async fn start_group(&self) -> Vec<(Cluster, Replica)> {
        self.start_group_with(TopicConfig::default(), 60).await
    }

    /// [`start_group`](Self::start_group), the topic created with `topic`'s settings and
    /// segments of `segment_bytes`.
    async fn start_group_with(
        &self,
        topic: TopicConfig,
        segment_bytes: u64,
    ) -> Vec<(Cluster, Replica)> {
        let mut nodes = Vec::new();
        for id in [1, 2, 3] {
            nodes.push(
                self.start_replica_opts(id, partition_config(), segment_bytes, topic)
                    .await,
            );
        }
        nodes[0]
            .1
            .raft
            .initialize(replica_peers(&[1, 2, 3]))
            .await
            .unwrap();
        nodes
    }

    async fn partition_leader_among(&self, nodes: &[&Replica]) -> u64 {
        let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
        let m = nodes[0]
            .raft
            .wait(Some(DEADLINE))
            .metrics(
                |m| m.current_leader.is_some_and(|l| ids.contains(&l)),
                "a partition leader among the live replicas",
            )
            .await
            .unwrap();
        m.current_leader.unwrap()
    }
}

/// Messages as a client sends them (offset and timestamp 0).
fn message_set(values: &[&str]) -> (u32, Vec<u8>) {
    use streambus_core::{Encode, Message, MessageSetBuilder};
    let msgs: Vec<Message<'_>> = values
        .iter()
        .map(|v| Message::new(b"", v.as_bytes()))
        .collect();
    let mut buf = vec![0u8; msgs.iter().map(Encode::encoded_len).sum()];
    let mut b = MessageSetBuilder::new(&mut buf);
    for m in &msgs {
        b.push(m).unwrap();
    }
    (b.count(), buf)
}

/// A batch to propose, as a client sent it.
fn batch(values: &[&str]) -> Batch {
    let (n, buf) = message_set(values);
    let set = streambus_core::MessageSet::new_checked(n, &buf).unwrap();
    Batch::new(&set, 1_000, None)
}

/// Proposes a batch on the leader; returns its log index and what applying it did.
async fn produce(leader: &Replica, values: &[&str]) -> (u64, BatchApplied) {
    let r = leader.raft.client_write(batch(values)).await.unwrap();
    (r.log_id.index, r.data)
}

fn replica_peers(ids: &[u64]) -> BTreeMap<u64, BasicNode> {
    ids.iter()
        .map(|id| (*id, BasicNode::new(format!("node-{id}"))))
        .collect()
}

async fn stop_replica(t: &TestCluster, r: Replica) {
    r.raft.shutdown().await.unwrap();
    t.stop(r.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_commit_batches_and_hold_byte_identical_logs() {
    let t = TestCluster::new(&[1, 2, 3]);
    let nodes = t.start_group().await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let l = reps.iter().find(|r| r.id == leader).unwrap();
    let mut last = 0;
    let mut applied = Vec::new();
    for values in [&["a", "b", "c"][..], &["d"], &["e", "f"]] {
        let (index, a) = produce(l, values).await;
        applied.push((a.base_offset, a.count, a.high_water_mark));
        last = index;
    }
    assert_eq!(applied, [(0, 3, 3), (3, 1, 4), (4, 2, 6)]);
    // Index 0 is the initial membership, 1 the leader's blank entry, then the batches.
    assert_eq!(last, 4);
    for r in &reps {
        r.wait_applied(last).await;
        assert_eq!(r.offsets(), (0, 6), "node {}", r.id);
        assert_eq!(r.values(0), ["a", "b", "c", "d", "e", "f"], "node {}", r.id);
        let kinds: Vec<_> = r
            .entries()
            .iter()
            .map(|e| (e.log_id.index, e.kind, e.base_offset, e.count))
            .collect();
        use crate::storage::RaftEntryKind::{Blank, Membership, Records};
        assert_eq!(
            kinds,
            [
                (0, Membership, 0, 0),
                (1, Blank, 0, 0),
                (2, Records, 0, 3),
                (3, Records, 3, 1),
                (4, Records, 4, 2)
            ],
            "node {}",
            r.id
        );
    }
    // Every replica's segment files are the same bytes (60-byte segments: one per batch).
    let files = reps[0].segment_files();
    assert_eq!(
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "00000000000000000000.idx",
            "00000000000000000000.log",
            "00000000000000000003.idx",
            "00000000000000000003.log",
            "00000000000000000004.idx",
            "00000000000000000004.log"
        ]
    );
    for r in &reps[1..] {
        assert_eq!(r.segment_files(), files, "node {}", r.id);
    }
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leaders_uncommitted_tail_is_truncated_by_the_next_leader() {
    let t = TestCluster::new(&[1, 2, 3]);
    let nodes = t.start_group().await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let old = t.partition_leader_among(&reps).await;
    let o = *reps.iter().find(|r| r.id == old).unwrap();
    let (first, _) = produce(o, &["committed"]).await;
    for r in &reps {
        r.wait_applied(first).await;
    }
    // Cut off, the old leader still appends a batch it can never commit.
    t.router.down.lock().unwrap().insert(old);
    let lost = batch(&["lost-1", "lost-2"]);
    let raft = o.raft.clone();
    let pending = tokio::spawn(async move { raft.client_write(lost).await });
    o.raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.last_log_index == Some(first + 1),
            "the uncommitted batch in the old leader's log",
        )
        .await
        .unwrap();
    assert_eq!(o.storage.raft_log_state("orders", 0).unwrap().end, 3);
    assert_eq!(o.offsets(), (0, 1), "an uncommitted batch is not readable");
    // The others elect a leader, which writes at the same offset.
    let rest: Vec<&Replica> = reps.iter().copied().filter(|r| r.id != old).collect();
    let new = t.partition_leader_among(&rest).await;
    assert_ne!(new, old);
    let n = *rest.iter().find(|r| r.id == new).unwrap();
    let (index, a) = produce(n, &["kept"]).await;
    assert_eq!((a.base_offset, a.count, a.high_water_mark), (1, 1, 2));
    // Back on the network, the old leader's divergent tail is replaced by the new leader's.
    t.router.down.lock().unwrap().remove(&old);
    o.wait_applied(index).await;
    for r in &reps {
        assert_eq!(r.values(0), ["committed", "kept"], "node {}", r.id);
        assert_eq!(r.offsets(), (0, 2), "node {}", r.id);
        assert_eq!(r.entries(), n.entries(), "node {}", r.id);
        assert_eq!(r.segment_files(), n.segment_files(), "node {}", r.id);
    }
    // The proposal that lost its leadership is answered with an error, never as written.
    assert!(pending.await.unwrap().is_err());
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

/// The bytes of a batch of one value `v0`..`v9`: the segment size that holds one such batch.
fn one_batch() -> u64 {
    message_set(&["v0"]).1.len() as u64
}

/// A topic whose retention keeps three one-value batches.
fn retaining_three_batches() -> TopicConfig {
    TopicConfig {
        retention_bytes: Some(3 * one_batch()),
        ..TopicConfig::default()
    }
}

/// Waits until `r`'s log is purged up to index `index`.
async fn wait_purged(r: &Replica, index: u64) {
    r.raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index == index),
            "the log purged up to the retention point",
        )
        .await
        .unwrap();
}

/// The `.log` files of a partition directory's segments, by base offset.
fn log_files(files: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    files
        .keys()
        .filter(|n| n.ends_with(".log"))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_snapshots_at_a_segment_boundary_and_purges_whole_segments_on_each_replica()
 {
    let t = TestCluster::new(&[1, 2, 3]);
    let nodes = t
        .start_group_with(retaining_three_batches(), one_batch())
        .await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let l = *reps.iter().find(|r| r.id == leader).unwrap();
    let mut last = 0;
    for i in 0..8 {
        last = produce(l, &[&format!("v{i}")]).await.0;
    }
    for r in &reps {
        r.wait_applied(last).await;
    }
    // Entries 0 (membership) and 1 (blank) share v0's segment; v1..v7 are entries 3..9, one
    // segment each (a segment holds one batch). Keeping three batches drops the segments of v0..v4: the point is v4's
    // entry, 6 — or, with only entries up to 5 applied, v3's.
    let now = crate::storage::unix_now_ns();
    let id_at = |i: u64| {
        l.entries()
            .iter()
            .find(|e| e.log_id.index == i)
            .unwrap()
            .log_id
    };
    let point = |applied| {
        l.storage
            .raft_retention_point("orders", 0, now, applied)
            .unwrap()
    };
    assert_eq!(point(u64::MAX), Some(id_at(6)));
    assert_eq!(point(5), Some(id_at(5)));
    assert_eq!(point(1), None);
    let (point, entries) = (id_at(6), l.entries());
    for r in &reps {
        assert_eq!(
            r.storage.enforce_retention(now).unwrap(),
            0,
            "node {}",
            r.id
        );
    }
    for r in &reps {
        wait_purged(r, 6).await;
        let m = r.raft.metrics().borrow().clone();
        let snapshot = m
            .snapshot
            .map(|s| (s.leader_id.term, s.leader_id.node_id, s.index));
        assert_eq!(
            snapshot,
            Some((point.term, point.node_id, point.index)),
            "node {}",
            r.id
        );
        let st = r.storage.raft_log_state("orders", 0).unwrap();
        assert_eq!(
            (st.log_start, st.high_water_mark, st.end, st.last_purged),
            (5, 8, 8, Some(point)),
            "node {}",
            r.id
        );
        assert_eq!(r.offsets(), (5, 8), "node {}", r.id);
        assert_eq!(r.values(5), ["v5", "v6", "v7"], "node {}", r.id);
        assert_eq!(r.entries(), entries[7..], "node {}", r.id);
        let files = r.segment_files();
        assert_eq!(
            log_files(&files),
            [
                "00000000000000000005.log",
                "00000000000000000006.log",
                "00000000000000000007.log"
            ],
            "node {}",
            r.id
        );
        assert_eq!(files, l.segment_files(), "node {}", r.id);
    }
    // What is left is kept; one more batch drops one more segment (v5's, entry 7).
    assert_eq!(
        l.storage
            .raft_retention_point("orders", 0, now, u64::MAX)
            .unwrap(),
        None
    );
    let (index, a) = produce(l, &["v8"]).await;
    assert_eq!((a.base_offset, a.high_water_mark), (8, 9));
    l.wait_applied(index).await;
    l.storage.enforce_retention(now).unwrap();
    wait_purged(l, 7).await;
    assert_eq!(l.offsets(), (6, 9));
    assert_eq!(l.values(6), ["v6", "v7", "v8"]);
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_after_its_retention_purge_reopens_at_its_log_start_and_catches_up() {
    let t = TestCluster::new(&[1, 2, 3]);
    let mut nodes = t
        .start_group_with(retaining_three_batches(), one_batch())
        .await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let follower = reps.iter().find(|r| r.id != leader).unwrap().id;
    let l = *reps.iter().find(|r| r.id == leader).unwrap();
    let mut last = 0;
    for i in 0..8 {
        last = propose(l, idempotent(7, i, &[&format!("v{i}")])).await.0;
    }
    let f = *reps.iter().find(|r| r.id == follower).unwrap();
    f.wait_applied(last).await;
    f.storage
        .enforce_retention(crate::storage::unix_now_ns())
        .unwrap();
    wait_purged(f, 6).await;
    // The follower stops (its snapshot is at entry 6, it had applied up to 9).
    stop_releasing_storage(&t, &mut nodes, follower).await;
    let l = &nodes.iter().find(|(_, r)| r.id == leader).unwrap().1;
    let (index, a) = propose(l, idempotent(7, 8, &["v8"])).await;
    assert_eq!(a, applied(8, 1, 9));
    // Restarted from its files: the log from offset 5, the state machine from the snapshot
    // with entries 7.. applied again on it.
    let (cluster, back) = t
        .start_replica_opts(
            follower,
            partition_config(),
            one_batch(),
            retaining_three_batches(),
        )
        .await;
    back.wait_applied(index).await;
    assert_eq!(back.offsets(), (5, 9));
    assert_eq!(back.values(5), ["v5", "v6", "v7", "v8"]);
    nodes.push((cluster, back));
    // It leads (the others never campaign once the leader stops) and knows the producer.
    for (_, r) in &nodes {
        if r.id != follower && r.id != leader {
            r.raft.runtime_config().elect(false);
        }
    }
    let k = nodes.iter().position(|(_, r)| r.id == leader).unwrap();
    let (_, r) = nodes.remove(k);
    stop_replica(&t, r).await;
    let rest: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    assert_eq!(t.partition_leader_among(&rest).await, follower);
    let b = *rest.iter().find(|r| r.id == follower).unwrap();
    // v4's batch: its records are gone from this replica, its sequence is in the snapshot.
    assert_eq!(
        propose(b, idempotent(7, 4, &["v4"])).await.1,
        applied(4, 1, 9)
    );
    assert_eq!(
        propose(b, idempotent(7, 9, &["v9"])).await.1,
        applied(9, 1, 10)
    );
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_purges_the_segments_whose_newest_record_is_older() {
    let t = TestCluster::new(&[1, 2, 3]);
    let topic = TopicConfig {
        retention_age: Some(Duration::from_secs(3600)),
        ..TopicConfig::default()
    };
    let nodes = t.start_group_with(topic, one_batch()).await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let l = *reps.iter().find(|r| r.id == leader).unwrap();
    // v0..v2 appended at 1 µs after the epoch, v3..v5 now.
    let now = crate::storage::unix_now_ns();
    let mut last = 0;
    for i in 0..6 {
        let v = format!("v{i}");
        let (n, buf) = message_set(&[&v]);
        let set = streambus_core::MessageSet::new_checked(n, &buf).unwrap();
        let at = if i < 3 { 1_000 } else { now };
        last = propose(l, Batch::new(&set, at, None)).await.0;
    }
    l.wait_applied(last).await;
    // v2 is entry 4: the segments up to it go.
    l.storage.enforce_retention(now).unwrap();
    wait_purged(l, 4).await;
    assert_eq!(l.offsets(), (3, 6));
    assert_eq!(l.values(3), ["v3", "v4", "v5"]);
    assert_eq!(
        log_files(&l.segment_files()),
        [
            "00000000000000000003.log",
            "00000000000000000004.log",
            "00000000000000000005.log"
        ]
    );
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_while_the_leaders_retention_purged_is_restored_by_snapshot() {
    let t = TestCluster::new(&[1, 2, 3]);
    let nodes = t
        .start_group_with(retaining_three_batches(), one_batch())
        .await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let l = *reps.iter().find(|r| r.id == leader).unwrap();
    let behind = *reps.iter().find(|r| r.id != leader).unwrap();
    let (first, _) = produce(l, &["v0"]).await;
    behind.wait_applied(first).await;
    // One follower misses the next batches, then the leader's retention purges its log.
    t.router.down.lock().unwrap().insert(behind.id);
    let mut last = 0;
    for i in 1..8 {
        last = produce(l, &[&format!("v{i}")]).await.0;
    }
    l.wait_applied(last).await;
    l.storage
        .enforce_retention(crate::storage::unix_now_ns())
        .unwrap();
    wait_purged(l, 6).await;
    assert_eq!(l.offsets(), (5, 8));
    // Back on the network, the follower gets the snapshot, then the log after it.
    t.router.down.lock().unwrap().remove(&behind.id);
    let (index, a) = produce(l, &["after"]).await;
    assert_eq!((a.base_offset, a.high_water_mark), (8, 9));
    behind.wait_applied(index).await;
    let snapshot = behind.raft.metrics().borrow().snapshot;
    assert_eq!(snapshot.map(|s| s.index), Some(6));
    let st = behind.storage.raft_log_state("orders", 0).unwrap();
    assert_eq!(
        (
            st.log_start,
            st.end,
            st.high_water_mark,
            st.last_purged.map(|p| p.index)
        ),
        (5, 9, 9, Some(6))
    );
    assert_eq!(behind.offsets(), l.offsets());
    assert_eq!(behind.values(5), ["v5", "v6", "v7", "after"]);
    assert_eq!(behind.entries(), l.entries());
    assert_eq!(behind.segment_files(), l.segment_files());
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restored_by_snapshot_then_leading_recognises_retries_of_purged_batches() {
    let t = TestCluster::new(&[1, 2, 3]);
    let mut nodes = t
        .start_group_with(retaining_three_batches(), one_batch())
        .await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let old = t.partition_leader_among(&reps).await;
    let l = *reps.iter().find(|r| r.id == old).unwrap();
    let behind = *reps.iter().find(|r| r.id != old).unwrap();
    let other = reps
        .iter()
        .find(|r| r.id != old && r.id != behind.id)
        .unwrap()
        .id;
    let (first, a) = propose(l, idempotent(7, 0, &["v0"])).await;
    assert_eq!(a, applied(0, 1, 1));
    behind.wait_applied(first).await;
    t.router.down.lock().unwrap().insert(behind.id);
    let mut last = 0;
    for i in 1..8 {
        let (index, a) = propose(l, idempotent(7, i, &[&format!("v{i}")])).await;
        assert_eq!(a, applied(i64::from(i), 1, i64::from(i) + 1));
        last = index;
    }
    l.wait_applied(last).await;
    l.storage
        .enforce_retention(crate::storage::unix_now_ns())
        .unwrap();
    wait_purged(l, 6).await;
    t.router.down.lock().unwrap().remove(&behind.id);
    let (index, a) = propose(l, idempotent(7, 8, &["v8"])).await;
    assert_eq!(a, applied(8, 1, 9));
    behind.wait_applied(index).await;
    assert_eq!(behind.offsets(), (5, 9));
    // The restored replica leads: the other one never campaigns, the old leader stops.
    reps.iter()
        .find(|r| r.id == other)
        .unwrap()
        .raft
        .runtime_config()
        .elect(false);
    let k = nodes.iter().position(|(_, r)| r.id == old).unwrap();
    let (_, r) = nodes.remove(k);
    stop_replica(&t, r).await;
    let rest: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let b = *rest.iter().find(|r| r.id != other).unwrap();
    assert_eq!(t.partition_leader_among(&rest).await, b.id);
    // Retries of batches acknowledged before the snapshot — v4 at offset 4, below the log
    // start, known from the snapshot's producer table; v6 after it — get their offsets.
    assert_eq!(
        propose(b, idempotent(7, 4, &["v4"])).await.1,
        applied(4, 1, 9)
    );
    assert_eq!(
        propose(b, idempotent(7, 6, &["v6"])).await.1,
        applied(6, 1, 9)
    );
    let (last, next) = propose(b, idempotent(7, 9, &["v9"])).await;
    assert_eq!(next, applied(9, 1, 10));
    for r in &rest {
        r.wait_applied(last).await;
    }
    assert_eq!(b.values(5), ["v5", "v6", "v7", "v8", "v9"]);
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

/// The production group settings once built a snapshot every 5 000 entries and purged the log
/// 1 000 entries behind it, deleting sealed segments that retention still kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_group_never_purges_its_log_on_its_own_past_5000_batches() {
    let t = TestCluster::new(&[1, 2, 3]);
    let mut nodes = Vec::new();
    for id in [1, 2, 3] {
        nodes.push(
            t.start_replica_with(id, replica::partition_raft_config(), 4096)
                .await,
        );
    }
    nodes[0]
        .1
        .raft
        .initialize(replica_peers(&[1, 2, 3]))
        .await
        .unwrap();
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let l = *reps.iter().find(|r| r.id == leader).unwrap();
    let n = 6_000;
    let mut last = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let writes = chunk.iter().map(|i| {
            let v = format!("v{i}");
            async move { produce(l, &[&v]).await.0 }
        });
        last = last.max(
            *futures::future::join_all(writes)
                .await
                .iter()
                .max()
                .unwrap(),
        );
    }
    for r in &reps {
        r.wait_applied(last).await;
        let m = r.raft.metrics().borrow().clone();
        assert_eq!((m.snapshot, m.purged), (None, None), "replica {}", r.id);
        let st = r.storage.raft_log_state("orders", 0).unwrap();
        assert_eq!(
            (st.log_start, st.high_water_mark),
            (0, n),
            "replica {}",
            r.id
        );
        assert_eq!(
            r.record_offsets(),
            (0..n).collect::<Vec<i64>>(),
            "replica {}",
            r.id
        );
    }
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_get_consecutive_offsets_stamped_by_the_leader() {
    let t = TestCluster::new(&[1, 2, 3]);
    let nodes = t.start_group().await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let l = *reps.iter().find(|r| r.id == leader).unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let raft = l.raft.clone();
            tokio::spawn(async move {
                let v = format!("m{i}");
                let r = raft.client_write(batch(&[&v, &v])).await.unwrap();
                (r.log_id.index, r.data, v)
            })
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    // In log order, the batches hold offsets 0, 2, 4, … whatever order they were proposed in.
    done.sort_by_key(|(index, _, _)| *index);
    let offsets: Vec<(i64, u32)> = done
        .iter()
        .map(|(_, a, _)| (a.base_offset, a.count))
        .collect();
    let want: Vec<(i64, u32)> = (0..20).map(|i| (2 * i, 2)).collect();
    assert_eq!(offsets, want);
    let values: Vec<String> = done
        .iter()
        .flat_map(|(_, _, v)| [v.clone(), v.clone()])
        .collect();
    let last = done.last().unwrap().0;
    for r in &reps {
        r.wait_applied(last).await;
        assert_eq!(r.offsets(), (0, 40), "node {}", r.id);
        assert_eq!(r.values(0), values, "node {}", r.id);
        assert_eq!(
            r.record_offsets(),
            (0..40).collect::<Vec<i64>>(),
            "node {}",
            r.id
        );
        assert_eq!(r.segment_files(), l.segment_files(), "node {}", r.id);
    }
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_reopens_its_log_and_vote_and_catches_up() {
    let t = TestCluster::new(&[1, 2, 3]);
    let mut nodes = t.start_group().await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let follower = reps.iter().find(|r| r.id != leader).unwrap().id;
    let (index, _) = produce(reps.iter().find(|r| r.id == leader).unwrap(), &["a", "b"]).await;
    for r in &reps {
        r.wait_applied(index).await;
    }
    // The follower stops; the others go on.
    stop_releasing_storage(&t, &mut nodes, follower).await;
    let l = &nodes.iter().find(|(_, r)| r.id == leader).unwrap().1;
    let (index, a) = produce(l, &["c"]).await;
    assert_eq!((a.base_offset, a.high_water_mark), (2, 3));
    // Restarted from its files: its log, vote and membership are back; it catches up.
    let (cluster, back) = t.start_replica(follower).await;
    back.wait_applied(index).await;
    assert_eq!(back.offsets(), (0, 3));
    assert_eq!(back.values(0), ["a", "b", "c"]);
    assert_eq!(back.entries(), l.entries());
    assert_eq!(back.segment_files(), l.segment_files());
    nodes.push((cluster, back));
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

/// Stops node `id` and its replica (taken out of `nodes`), and waits until its storage is
/// released (openraft's tasks hold it until they end, after `shutdown` returns: the data
/// directory is locked until then).
async fn stop_releasing_storage(t: &TestCluster, nodes: &mut Vec<(Cluster, Replica)>, id: u64) {
    let k = nodes.iter().position(|(_, r)| r.id == id).unwrap();
    let (cluster, r) = nodes.remove(k);
    r.raft.shutdown().await.unwrap();
    t.stop(id).await;
    drop(cluster);
    let Replica { storage, raft, .. } = r;
    drop(raft);
    let end = std::time::Instant::now() + DEADLINE;
    while Arc::strong_count(&storage) > 1 {
        assert!(
            std::time::Instant::now() < end,
            "the stopped group still holds the storage"
        );
        tokio::task::yield_now().await;
    }
}

/// A voter whose partition data was wiped may have voted in the current term and no longer
/// holds entries it helped commit: it grants no vote until it has caught up with a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_refuses_votes_until_it_has_caught_up_with_a_leader() {
    let t = TestCluster::new(&[1, 2, 3]);
    let mut nodes = t.start_group().await;
    // The metadata group knows the partition and the leader its group elected.
    nodes[0].0.raft().initialize(t.peers()).await.unwrap();
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let term = reps[0].raft.metrics().borrow().current_term;
    let l = *reps.iter().find(|r| r.id == leader).unwrap();
    let wiped = reps.iter().find(|r| r.id != leader).unwrap().id;
    let other = reps
        .iter()
        .find(|r| r.id != leader && r.id != wiped)
        .unwrap()
        .id;
    let meta = nodes[0].0.clone();
    meta.write(create("orders", 1, 3)).await.unwrap();
    meta.write(Command::LeaderChanged {
        topic: "orders".into(),
        partition: 0,
        leader: u32::try_from(leader).unwrap(),
        term,
    })
    .await
    .unwrap();
    let (index, _) = produce(l, &["a", "b"]).await;
    for r in &reps {
        r.wait_applied(index).await;
    }
    for (c, _) in &nodes {
        wait_applied(
            c,
            meta.raft().metrics().borrow().last_applied.unwrap().index,
        )
        .await;
    }
    // Its data directory is wiped (its metadata stays); it comes back cut off from the others.
    stop_releasing_storage(&t, &mut nodes, wiped).await;
    std::fs::remove_dir_all(t.dirs[&wiped].path().join("data")).unwrap();
    let cluster = t.start_cut_off(wiped).await;
    let (cluster, back) = t
        .open_replica(
            cluster,
            wiped,
            partition_config(),
            60,
            TopicConfig::default(),
        )
        .await;
    assert!(cluster.replicas().is_catching_up(&orders(), &back.raft));
    // A candidate with the whole log, in a later term: a blank voter would grant it.
    let other_last = nodes
        .iter()
        .find(|(_, r)| r.id == other)
        .unwrap()
        .1
        .raft
        .metrics()
        .borrow()
        .last_log_index;
    let request = openraft::raft::VoteRequest::new(
        openraft::Vote::new(term + 1, other),
        Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(term, leader),
            other_last.unwrap(),
        )),
    );
    let reply = answer(
        cluster.raft(),
        Some(&cluster),
        Rpc::Partition {
            topic: "orders".into(),
            partition: 0,
            rpc: replica::PartitionRpc::Vote(request),
        },
    )
    .await;
    let RpcReply::Partition(replica::PartitionReply::Vote(Ok(vote))) = reply else {
        panic!("not a vote reply: {reply:?}");
    };
    assert!(!vote.vote_granted);
    assert_eq!(back.raft.metrics().borrow().vote.leader_id.term, 0);
    // Back on the network, it catches up from the leader and votes again.
    t.router.down.lock().unwrap().remove(&wiped);
    let l = &nodes.iter().find(|(_, r)| r.id == leader).unwrap().1;
    let (index, a) = produce(l, &["c"]).await;
    assert_eq!((a.base_offset, a.high_water_mark), (2, 3));
    back.wait_applied(index).await;
    let end = std::time::Instant::now() + DEADLINE;
    while cluster.replicas().is_catching_up(&orders(), &back.raft) {
        assert!(std::time::Instant::now() < end, "still catching up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(back.values(0), ["a", "b", "c"]);
    assert_eq!(back.segment_files(), l.segment_files());
    nodes.push((cluster, back));
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_its_partition_is_told_with_the_new_leader() {
    let t = TestCluster::new(&[1, 2, 3]);
    let nodes = t.start_group().await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let old = t.partition_leader_among(&reps).await;
    // Every replica has the group's membership from the leader before it is cut off (else
    // the other two know no voters and elect no one).
    for r in &reps {
        r.raft
            .wait(Some(DEADLINE))
            .metrics(
                |m| {
                    m.current_leader == Some(old)
                        && m.membership_config.membership().voter_ids().count() == 3
                },
                "the leader and the membership on every replica",
            )
            .await
            .unwrap();
    }
    let o = *reps.iter().find(|r| r.id == old).unwrap();
    // Every replica has the membership (and a batch) before the leader is cut off.
    let (first, _) = produce(o, &["x"]).await;
    for r in &reps {
        r.wait_applied(first).await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let hook: replica::StepDownHook = Arc::new(move |topic, partition, leader| {
        let _ = tx.send((topic.to_owned(), partition, leader));
    });
    tokio::spawn(replica::watch_leadership(
        o.raft.clone(),
        old,
        orders(),
        hook,
    ));
    // Cut off, the old leader keeps believing it leads until it hears of the new term.
    t.router.down.lock().unwrap().insert(old);
    let rest: Vec<&Replica> = reps.iter().copied().filter(|r| r.id != old).collect();
    let new = t.partition_leader_among(&rest).await;
    assert!(rx.try_recv().is_err(), "told before it could know");
    t.router.down.lock().unwrap().remove(&old);
    let (topic, partition, leader) = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((topic.as_str(), partition), ("orders", 0));
    // Told once, with the new leader, or with none when it first hears of the new term from a
    // reply (before the new leader's AppendEntries): both interleavings are right.
    assert!(
        leader.is_none_or(|l| l == new),
        "{leader:?} (new leader {new})"
    );
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

// ---- Idempotent produce on replicated partitions (protocol §6.2) ----

/// An idempotent batch as producer `id` (epoch 0) sends it, from `seq` on.
fn idempotent(id: i64, seq: i32, values: &[&str]) -> Batch {
    let (n, buf) = message_set(values);
    let set = streambus_core::MessageSet::new_checked(n, &buf).unwrap();
    let producer = crate::storage::ProducerBatch {
        producer_id: id,
        epoch: 0,
        base_sequence: seq,
    };
    Batch::new(&set, 1_000, Some(producer))
}

/// Proposes `b` on the leader: what applying it answered (offsets, or the refusal's code).
async fn propose(leader: &Replica, b: Batch) -> (u64, BatchApplied) {
    let r = leader.raft.client_write(b).await.unwrap();
    (r.log_id.index, r.data)
}

fn applied(base_offset: i64, count: u32, high_water_mark: i64) -> BatchApplied {
    BatchApplied {
        base_offset,
        count,
        high_water_mark,
        refused: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_idempotent_batch_gets_its_original_offsets_and_is_stored_once() {
    use streambus_core::ErrorCode;
    let t = TestCluster::new(&[1, 2, 3]);
    let nodes = t.start_group().await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let leader = t.partition_leader_among(&reps).await;
    let l = reps.iter().find(|r| r.id == leader).unwrap();
    assert_eq!(
        propose(l, idempotent(7, 0, &["a", "b"])).await.1,
        applied(0, 2, 2)
    );
    assert_eq!(
        propose(l, idempotent(7, 2, &["c"])).await.1,
        applied(2, 1, 3)
    );
    // The first batch again (the acknowledgement was lost): its offsets, the current
    // high-water mark, nothing stored.
    assert_eq!(
        propose(l, idempotent(7, 0, &["a", "b"])).await.1,
        applied(0, 2, 3)
    );
    // A gap, and an unknown producer not starting at 0: refused as a single broker does.
    let (_, gap) = propose(l, idempotent(7, 5, &["x"])).await;
    let refused = gap.refused.unwrap();
    assert_eq!(refused.code, ErrorCode::OUT_OF_ORDER_SEQUENCE.0);
    assert_eq!(
        refused.message,
        "out of order sequence from producer 7 epoch 0: expected base sequence 3, received 5"
    );
    let (_, unknown) = propose(l, idempotent(8, 4, &["y"])).await;
    assert_eq!(unknown.refused.unwrap().code, ErrorCode::UNKNOWN_PRODUCER.0);
    // The next in sequence goes on from offset 3.
    let (last, next) = propose(l, idempotent(7, 3, &["d"])).await;
    assert_eq!(next, applied(3, 1, 4));
    for r in &reps {
        r.wait_applied(last).await;
        assert_eq!(r.values(0), ["a", "b", "c", "d"], "node {}", r.id);
        let kinds: Vec<_> = r
            .entries()
            .iter()
            .map(|e| (e.log_id.index, e.kind, e.base_offset, e.count))
            .collect();
        use crate::storage::RaftEntryKind::{Blank, Membership, Records};
        assert_eq!(
            kinds,
            [
                (0, Membership, 0, 0),
                (1, Blank, 0, 0),
                (2, Records, 0, 2),
                (3, Records, 2, 1),
                (4, Blank, 3, 0),
                (5, Blank, 3, 0),
                (6, Blank, 3, 0),
                (7, Records, 3, 1)
            ],
            "node {}",
            r.id
        );
    }
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_recognises_a_retry_of_a_batch_its_predecessor_acknowledged() {
    let t = TestCluster::new(&[1, 2, 3]);
    let mut nodes = t.start_group().await;
    let reps: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let old = t.partition_leader_among(&reps).await;
    let o = reps.iter().find(|r| r.id == old).unwrap();
    assert_eq!(
        propose(o, idempotent(7, 0, &["a"])).await.1,
        applied(0, 1, 1)
    );
    let (index, acked) = propose(o, idempotent(7, 1, &["b", "c"])).await;
    assert_eq!(acked, applied(1, 2, 3));
    for r in &reps {
        r.wait_applied(index).await;
    }
    // The leader dies after acknowledging; the producer retries at the new leader.
    let k = nodes.iter().position(|(_, r)| r.id == old).unwrap();
    let (_, r) = nodes.remove(k);
    stop_replica(&t, r).await;
    let rest: Vec<&Replica> = nodes.iter().map(|(_, r)| r).collect();
    let new = t.partition_leader_among(&rest).await;
    assert_ne!(new, old);
    let n = rest.iter().find(|r| r.id == new).unwrap();
    assert_eq!(
        propose(n, idempotent(7, 1, &["b", "c"])).await.1,
        applied(1, 2, 3)
    );
    let (last, next) = propose(n, idempotent(7, 3, &["d"])).await;
    assert_eq!(next, applied(3, 1, 4));
    for r in &rest {
        r.wait_applied(last).await;
        assert_eq!(r.values(0), ["a", "b", "c", "d"], "node {}", r.id);
        assert_eq!(r.record_offsets(), [0, 1, 2, 3], "node {}", r.id);
    }
    for (_, r) in nodes {
        stop_replica(&t, r).await;
    }
}

#[test]
fn a_partition_entry_on_the_link_costs_its_records_and_a_few_bytes_more() {
    use super::network::{Rpc, encoding_sizes};
    use super::replica::PartitionRpc;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    // 100 records of a 100-byte value: a batch as the SDK sends one.
    let values: Vec<String> = (0..100).map(|i| format!("{i:0100}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let b = batch(&refs);
    let records = b.records.len();
    let leader = CommittedLeaderId::new(3, 1);
    let rpc = Rpc::Partition {
        topic: "orders".into(),
        partition: 0,
        rpc: PartitionRpc::AppendEntries(openraft::raft::AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(leader, 41)),
            entries: vec![Entry {
                log_id: LogId::new(leader, 42),
                payload: EntryPayload::Normal(b),
            }],
            leader_commit: Some(LogId::new(leader, 41)),
        }),
    };
    let (postcard, json) = encoding_sizes(&rpc);
    assert!(
        postcard <= records + 64,
        "{postcard} bytes on the link for {records} bytes of records"
    );
    // What version 2 sent: each byte as a decimal number and a comma.
    assert!(json > records * 5 / 2, "{json} bytes of JSON for {records}");
}

/// A partition leader whose publication fails to commit (no metadata leader) is written again
/// until it commits, and a later term for the same partition replaces it while it waits.
#[tokio::test]
async fn a_published_partition_leader_that_fails_to_commit_is_written_again_until_it_does() {
    use super::state::Elected;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // (partition, term, committed) per attempt; partition 0 fails its first two attempts.
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&attempts);
    let write = move |id: PartitionId, e: Elected| {
        let log = Arc::clone(&log);
        async move {
            let mut a = log.lock().unwrap();
            let before = a.iter().filter(|(p, _, _)| *p == id.partition).count();
            let ok = id.partition != 0 || before >= 2;
            a.push((id.partition, e.term, ok));
            if ok {
                Ok(())
            } else {
                Err(ClusterError::NoLeader("no metadata leader (test)".into()))
            }
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let retry = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(10))
        .without_max_times();
    let pid = |partition| PartitionId {
        topic: "orders".into(),
        partition,
    };
    // Sent before the task runs: term 4 of partition 0 replaces term 3 before any attempt.
    tx.send((pid(0), Elected { leader: 1, term: 3 })).unwrap();
    tx.send((pid(0), Elected { leader: 2, term: 4 })).unwrap();
    tx.send((pid(1), Elected { leader: 3, term: 3 })).unwrap();
    let task = tokio::spawn(super::publish_until_committed(
        rx,
        async move {
            let _ = stopped.await;
        },
        write,
        retry,
    ));
    let end = std::time::Instant::now() + DEADLINE;
    while !attempts.lock().unwrap().contains(&(0, 4, true)) {
        assert!(
            std::time::Instant::now() < end,
            "{:?}",
            attempts.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.send(()).unwrap();
    task.await.unwrap();
    let a = attempts.lock().unwrap().clone();
    let of = |p| a.iter().filter(|x| x.0 == p).copied().collect::<Vec<_>>();
    assert_eq!(of(0), [(0, 4, false), (0, 4, false), (0, 4, true)]);
    assert_eq!(of(1), [(1, 3, true)]);
}
