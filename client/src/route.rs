//! Routing: which broker leads each partition, learnt from Metadata (protocol §6.4).
//!
//! The table is pure data (no pools, no I/O) so its rules are tested in-process; the
//! [`Client`](crate::Client) keeps it with one connection pool per broker address beside it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::types::Metadata;

/// FxHash: the keys are topic names the application chose and node ids, not peer input.
type FxBuild = rustc_hash::FxBuildHasher;

/// The brokers and the leader of every partition the client has asked Metadata about.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    /// Node id → client address (`host:port`), from the latest Metadata.
    brokers: HashMap<u32, Arc<str>, FxBuild>,
    /// Topic → leader node id per partition (index = partition id; `None`: no leader now).
    leaders: HashMap<Arc<str>, Box<[Option<u32>]>, FxBuild>,
}

impl RouteTable {
    /// Takes in a Metadata reply. `every_topic`: it answered a request for every topic, so a
    /// topic it does not list no longer exists. The brokers are replaced by the reply's.
    pub(crate) fn learn(&mut self, m: &Metadata, every_topic: bool) {
        self.brokers = m
            .brokers
            .iter()
            .map(|b| (b.node_id, Arc::from(b.address())))
            .collect();
        if every_topic {
            self.leaders.clear();
        }
        for t in &m.topics {
            if !t.exists() {
                self.leaders.remove(t.name.as_str());
                continue;
            }
            // Partition ids run 0..count, so the table holds as many as are listed: sizing
            // it by the largest id would let one id of u32::MAX ask for 32 GiB. An id past
            // the count listed is left out (its requests go to the bootstrap broker, whose
            // NotLeader reads the Metadata again).
            let mut leaders = vec![None; t.partitions.len()];
            for p in &t.partitions {
                if let Some(slot) = leaders.get_mut(p.partition as usize) {
                    *slot = p.leader;
                }
            }
            self.leaders
                .insert(Arc::from(t.name.as_str()), leaders.into_boxed_slice());
        }
    }

    /// Whether the cluster has several brokers (then partitions are routed; a single broker
    /// serves everything through the bootstrap connection, whatever address it advertises).
    pub(crate) fn is_cluster(&self) -> bool {
        self.brokers.len() > 1
    }

    /// The client address of the partition's leader, when the table knows it (`None`: the
    /// topic or partition is not known, it has no leader now, or its leader's address is not
    /// registered: the request goes to the bootstrap broker, whose NotLeader refreshes the
    /// table).
    pub(crate) fn leader(&self, topic: &str, partition: u32) -> Option<&Arc<str>> {
        let node = (*self.leaders.get(topic)?.get(partition as usize)?)?;
        self.brokers.get(&node)
    }

    /// Whether `addr` is a broker of the latest Metadata.
    pub(crate) fn has_address(&self, addr: &str) -> bool {
        self.brokers.values().any(|a| **a == *addr)
    }

    /// The brokers' addresses, by node id.
    pub(crate) fn addresses(&self) -> Vec<Arc<str>> {
        let mut ids: Vec<(&u32, &Arc<str>)> = self.brokers.iter().collect();
        ids.sort_by_key(|(id, _)| **id);
        ids.into_iter().map(|(_, a)| a.clone()).collect()
    }

    /// The topics the table holds (the ones the periodic refresh asks about).
    pub(crate) fn topics(&self) -> Vec<Arc<str>> {
        let mut t: Vec<Arc<str>> = self.leaders.keys().cloned().collect();
        t.sort();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use crate::types::{BrokerMetadata, PartitionMetadata, TopicMetadata};

    fn broker(node_id: u32, port: u16) -> BrokerMetadata {
        BrokerMetadata {
            node_id,
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn topic(name: &str, leaders: &[Option<u32>]) -> TopicMetadata {
        TopicMetadata {
            name: name.into(),
            error_code: ErrorCode::NONE,
            partitions: (0u32..)
                .zip(leaders)
                .map(|(partition, leader)| PartitionMetadata {
                    partition,
                    leader: *leader,
                    leader_epoch: 0,
                    replicas: vec![1, 2, 3],
                })
                .collect(),
        }
    }

    fn three_brokers(topics: Vec<TopicMetadata>) -> Metadata {
        Metadata {
            brokers: vec![broker(1, 9001), broker(2, 9002), broker(3, 9003)],
            topics,
        }
    }

    #[test]
    fn each_partition_routes_to_its_leaders_address() {
        let mut t = RouteTable::default();
        let leaders = [1, 2, 3, 1, 2, 3].map(Some);
        t.learn(&three_brokers(vec![topic("orders", &leaders)]), false);
        assert!(t.is_cluster());
        let got: Vec<Option<&str>> = (0..7)
            .map(|p| t.leader("orders", p).map(|a| &**a))
            .collect();
        assert_eq!(
            got,
            [
                Some("127.0.0.1:9001"),
                Some("127.0.0.1:9002"),
                Some("127.0.0.1:9003"),
                Some("127.0.0.1:9001"),
                Some("127.0.0.1:9002"),
                Some("127.0.0.1:9003"),
                None, // no partition 6
            ]
        );
        assert_eq!(t.leader("other", 0), None);
        assert_eq!(t.topics(), [Arc::from("orders")]);
        assert_eq!(
            t.addresses(),
            ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"].map(Arc::from)
        );
    }

    #[test]
    fn a_refresh_moves_a_leader_and_forgets_what_is_gone() {
        let mut t = RouteTable::default();
        t.learn(
            &three_brokers(vec![
                topic("a", &[Some(1), Some(2)]),
                topic("b", &[Some(3)]),
            ]),
            false,
        );
        // A refresh of topic "a" (after a NotLeader): partition 1 moved to broker 3, and
        // partition 0 has no leader now (an election).
        t.learn(&three_brokers(vec![topic("a", &[None, Some(3)])]), false);
        assert_eq!(t.leader("a", 0), None);
        assert_eq!(t.leader("a", 1).map(|a| &**a), Some("127.0.0.1:9003"));
        assert_eq!(t.leader("b", 0).map(|a| &**a), Some("127.0.0.1:9003"));
        // A topic asked for that does not exist any more is forgotten.
        let mut gone = topic("b", &[]);
        gone.error_code = ErrorCode::TOPIC_NOT_FOUND;
        t.learn(&three_brokers(vec![gone]), false);
        assert_eq!(t.leader("b", 0), None);
        // A reply for every topic replaces the table; broker 3 left the cluster, so the
        // partition it led has no address.
        let mut m = three_brokers(vec![topic("a", &[Some(1), Some(3)])]);
        m.brokers.pop();
        t.learn(&m, true);
        assert_eq!(t.leader("a", 0).map(|a| &**a), Some("127.0.0.1:9001"));
        assert_eq!(t.leader("a", 1), None);
        assert!(!t.has_address("127.0.0.1:9003"));
        assert!(t.has_address("127.0.0.1:9002"));
        assert_eq!(t.topics(), [Arc::from("a")]);
    }

    #[test]
    fn a_partition_id_past_the_count_listed_is_left_out() {
        let mut t = RouteTable::default();
        let mut m = three_brokers(vec![topic("a", &[Some(1), Some(2)])]);
        if let Some(p) = m.topics.get_mut(0).and_then(|t| t.partitions.get_mut(1)) {
            p.partition = u32::MAX;
        }
        t.learn(&m, true);
        assert_eq!(t.leader("a", 0).map(|a| &**a), Some("127.0.0.1:9001"));
        assert_eq!(t.leader("a", 1), None);
        assert_eq!(t.leader("a", u32::MAX), None);
        assert_eq!(t.leaders.get("a").map(|l| l.len()), Some(2));
    }

    #[test]
    fn a_single_broker_is_not_routed() {
        let mut t = RouteTable::default();
        assert!(!t.is_cluster());
        t.learn(
            &Metadata {
                brokers: vec![broker(0, 9092)],
                topics: vec![topic("t", &[Some(0)])],
            },
            true,
        );
        assert!(!t.is_cluster());
    }
}
