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
            None,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_link_refuses_another_version_with_a_message_naming_both() {
    use super::network::{Hello, LINK_NAME, LINK_VERSION, TcpTransport, connect, serve};
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::open(7, dir.path(), raft_config(), TcpTransport::new(7), None)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(serve(listener, c.clone()));
    let hello = |link: &str, version| Hello {
        link: link.into(),
        version,
        from: 1,
    };
    connect(&addr, &hello(LINK_NAME, LINK_VERSION))
        .await
        .unwrap();
    let e = connect(&addr, &hello(LINK_NAME, 2)).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{addr} refused the cluster link: cluster link version 2 is not supported: broker 7 speaks version 1"
        )
    );
    let e = connect(&addr, &hello("kafka", 1)).await.unwrap_err();
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
