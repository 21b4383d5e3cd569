//! 0x11 Metadata (§6.4): the request's topic names and the reply's brokers, topics,
//! partitions and replicas.
//!
//! Decoding validates the whole payload once and keeps views over the wire bytes; encoding
//! reads caller-owned slices. Every list is bounded by its count, which is checked against
//! the bytes left before anything is read, so no count a peer sends can make the decoder loop
//! beyond its input.

use core::fmt;

use crate::error::{EncodeError, Malformed};
use crate::wire::types::{ErrorCode, Topic};
use crate::wire::{Reader, Text, Writer, len_u32};

/// One element of a Metadata list: how it is read, sized and written.
trait Item<'a>: Sized + Copy {
    /// The fewest bytes one element takes on the wire (bounds the count).
    const MIN_LEN: usize;
    /// The count field's name, for errors.
    const COUNT_FIELD: &'static str;
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed>;
    fn encoded_len(&self) -> usize;
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError>;
}

/// Defines a list type borrowed from wire bytes (decoded) or from a caller's slice (to
/// encode), with its iterator, in the shape of [`TopicList`](crate::TopicList).
macro_rules! wire_list {
    ($(#[$doc:meta])* $list:ident, $(#[$idoc:meta])* $iter:ident, $item:ty) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        pub struct $list<'a>(ListRepr<'a, $item>);

        impl<'a> $list<'a> {
            /// A list to encode.
            pub const fn from_slice(items: &'a [$item]) -> Self {
                Self(ListRepr::Slice(items))
            }

            /// The number of elements.
            pub fn len(&self) -> usize {
                match self.0 {
                    ListRepr::Wire { count, .. } => count as usize,
                    ListRepr::Slice(s) => s.len(),
                }
            }

            /// Whether there are none.
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }

            /// The elements in order.
            pub fn iter(&self) -> $iter<'a> {
                $iter(match self.0 {
                    ListRepr::Wire { count, bytes } => IterRepr::Wire {
                        left: count,
                        r: Reader::new(bytes),
                    },
                    ListRepr::Slice(s) => IterRepr::Slice(s.iter()),
                })
            }

            /// Reads a count and that many elements, keeping the bytes they span.
            fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
                let count = r.count(<$item as Item<'a>>::COUNT_FIELD, <$item as Item<'a>>::MIN_LEN)?;
                let start = r.rest();
                for _ in 0..count {
                    <$item as Item<'a>>::read(r)?;
                }
                Ok(Self(ListRepr::Wire {
                    count,
                    bytes: r.read_since(start),
                }))
            }

            /// The count field and the elements.
            fn encoded_len(&self) -> usize {
                match self.0 {
                    ListRepr::Wire { bytes, .. } => bytes.len().saturating_add(4),
                    ListRepr::Slice(s) => s
                        .iter()
                        .fold(4, |sum: usize, i| sum.saturating_add(i.encoded_len())),
                }
            }

            fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
                w.u32(len_u32(self.len())?)?;
                match self.0 {
                    ListRepr::Wire { bytes, .. } => w.put(bytes),
                    ListRepr::Slice(s) => s.iter().try_for_each(|i| i.write(w)),
                }
            }
        }

        impl PartialEq for $list<'_> {
            fn eq(&self, other: &Self) -> bool {
                self.len() == other.len() && self.iter().eq(other.iter())
            }
        }

        impl Eq for $list<'_> {}

        impl fmt::Debug for $list<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.iter()).finish()
            }
        }

        #[cfg(feature = "defmt")]
        impl defmt::Format for $list<'_> {
            fn format(&self, f: defmt::Formatter<'_>) {
                defmt::write!(f, "{}({=usize})", stringify!($list), self.len())
            }
        }

        $(#[$idoc])*
        #[derive(Clone)]
        pub struct $iter<'a>(IterRepr<'a, $item>);

        impl fmt::Debug for $iter<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($iter)).finish_non_exhaustive()
            }
        }

        impl<'a> Iterator for $iter<'a> {
            type Item = $item;

            fn next(&mut self) -> Option<$item> {
                match &mut self.0 {
                    IterRepr::Slice(it) => it.next().copied(),
                    IterRepr::Wire { left, r } => {
                        *left = left.checked_sub(1)?;
                        // Validated when the list was decoded: cannot fail here.
                        <$item as Item<'a>>::read(r).ok()
                    }
                }
            }

            fn size_hint(&self) -> (usize, Option<usize>) {
                let n = match &self.0 {
                    IterRepr::Slice(it) => it.len(),
                    IterRepr::Wire { left, .. } => *left as usize,
                };
                (n, Some(n))
            }
        }

        impl ExactSizeIterator for $iter<'_> {}
    };
}

#[derive(Clone, Copy)]
enum ListRepr<'a, T> {
    Wire { count: u32, bytes: &'a [u8] },
    Slice(&'a [T]),
}

#[derive(Clone)]
enum IterRepr<'a, T> {
    Wire { left: u32, r: Reader<'a> },
    Slice(core::slice::Iter<'a, T>),
}

impl<'a> Item<'a> for Topic<'a> {
    // A u32 length and at least one name byte.
    const MIN_LEN: usize = 5;
    const COUNT_FIELD: &'static str = "topic count";
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        Topic::from_bytes(r.bytes("topic")?)
    }
    fn encoded_len(&self) -> usize {
        Topic::encoded_len(self)
    }
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.as_str().as_bytes())
    }
}

wire_list!(
    /// The topic names of a Metadata request; empty means every topic.
    TopicNames,
    /// Iterator over [`TopicNames`].
    TopicNamesIter,
    Topic<'a>
);

/// 0x11 Metadata request: the topics asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MetadataRequest<'a> {
    /// The topics; empty asks for every topic.
    pub topics: TopicNames<'a>,
}

impl<'a> MetadataRequest<'a> {
    /// A request for every topic.
    pub const ALL_TOPICS: MetadataRequest<'static> = MetadataRequest {
        topics: TopicNames::from_slice(&[]),
    };

    pub(crate) fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        Ok(Self {
            topics: TopicNames::read(r)?,
        })
    }

    #[inline(never)]
    pub(crate) fn encoded_len(&self) -> usize {
        self.topics.encoded_len()
    }

    #[inline(never)]
    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.topics.write(w)
    }
}

/// One broker of a Metadata reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BrokerInfo<'a> {
    /// The broker's node id.
    pub node_id: u32,
    /// The host clients connect to (its advertised address).
    pub host: Text<'a>,
    /// The port clients connect to.
    pub port: u16,
}

impl<'a> Item<'a> for BrokerInfo<'a> {
    // NodeID, an empty host's length, Port.
    const MIN_LEN: usize = 4 + 4 + 2;
    const COUNT_FIELD: &'static str = "broker count";
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        Ok(Self {
            node_id: r.u32("node id")?,
            host: Text(r.bytes("host")?),
            port: r.u16("port")?,
        })
    }
    fn encoded_len(&self) -> usize {
        self.host.0.len().saturating_add(4 + 4 + 2)
    }
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.node_id)?;
        w.bytes(self.host.0)?;
        w.u16(self.port)
    }
}

wire_list!(
    /// The brokers of a Metadata reply.
    BrokerList,
    /// Iterator over a [`BrokerList`].
    BrokerListIter,
    BrokerInfo<'a>
);

/// A replica's node id, as an element of [`ReplicaList`].
impl<'a> Item<'a> for u32 {
    const MIN_LEN: usize = 4;
    const COUNT_FIELD: &'static str = "replica count";
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        r.u32("replica id")
    }
    fn encoded_len(&self) -> usize {
        4
    }
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(*self)
    }
}

wire_list!(
    /// The node ids holding a partition's replicas.
    ReplicaList,
    /// Iterator over a [`ReplicaList`].
    ReplicaListIter,
    u32
);

/// One partition of a Metadata reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PartitionMetadata<'a> {
    /// The partition.
    pub partition: u32,
    /// The leader's node id, or -1 when the partition has no leader now.
    pub leader: i32,
    /// The leader's epoch (≥ 0 from a conforming broker).
    pub leader_epoch: i32,
    /// The node ids holding replicas.
    pub replicas: ReplicaList<'a>,
}

impl<'a> Item<'a> for PartitionMetadata<'a> {
    // PartitionID, LeaderID, LeaderEpoch, NumReplicas.
    const MIN_LEN: usize = 16;
    const COUNT_FIELD: &'static str = "partition count";
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        Ok(Self {
            partition: r.u32("partition")?,
            leader: r.i32("leader id")?,
            leader_epoch: r.i32("leader epoch")?,
            replicas: ReplicaList::read(r)?,
        })
    }
    fn encoded_len(&self) -> usize {
        self.replicas.encoded_len().saturating_add(12)
    }
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(self.partition)?;
        w.i32(self.leader)?;
        w.i32(self.leader_epoch)?;
        self.replicas.write(w)
    }
}

wire_list!(
    /// The partitions of one topic in a Metadata reply.
    PartitionList,
    /// Iterator over a [`PartitionList`].
    PartitionListIter,
    PartitionMetadata<'a>
);

/// One topic of a Metadata reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TopicMetadata<'a> {
    /// The topic.
    pub name: Topic<'a>,
    /// [`ErrorCode::NONE`], or [`ErrorCode::TOPIC_NOT_FOUND`] for a topic asked for that does
    /// not exist (then it has no partitions).
    pub error_code: ErrorCode,
    /// Its partitions, in increasing id.
    pub partitions: PartitionList<'a>,
}

impl<'a> Item<'a> for TopicMetadata<'a> {
    // A name (length and one byte), ErrorCode, NumPartitions.
    const MIN_LEN: usize = 5 + 2 + 4;
    const COUNT_FIELD: &'static str = "topic count";
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        Ok(Self {
            name: Topic::from_bytes(r.bytes("topic")?)?,
            error_code: ErrorCode(r.u16("error code")?),
            partitions: PartitionList::read(r)?,
        })
    }
    fn encoded_len(&self) -> usize {
        self.name
            .encoded_len()
            .saturating_add(2)
            .saturating_add(self.partitions.encoded_len())
    }
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.name.as_str().as_bytes())?;
        w.u16(self.error_code.0)?;
        self.partitions.write(w)
    }
}

wire_list!(
    /// The topics of a Metadata reply.
    TopicMetadataList,
    /// Iterator over a [`TopicMetadataList`].
    TopicMetadataListIter,
    TopicMetadata<'a>
);

/// Metadata success: the brokers, then the topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MetadataResponse<'a> {
    /// The brokers of the cluster.
    pub brokers: BrokerList<'a>,
    /// The topics, once each, in byte order of their names.
    pub topics: TopicMetadataList<'a>,
}

impl<'a> MetadataResponse<'a> {
    #[inline(never)]
    pub(crate) fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        Ok(Self {
            brokers: BrokerList::read(r)?,
            topics: TopicMetadataList::read(r)?,
        })
    }

    pub(crate) fn encoded_len(&self) -> usize {
        self.brokers
            .encoded_len()
            .saturating_add(self.topics.encoded_len())
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.brokers.write(w)?;
        self.topics.write(w)
    }
}
