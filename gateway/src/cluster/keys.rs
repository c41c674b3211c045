//! Names of the Redis keys and channels of one cluster, all under `{key_prefix}:` (the table is
//! in the module docs of `cluster`).

pub(crate) struct Keys {
    prefix: String,
    pub(crate) bus_all: String,
    /// This node's own channel.
    pub(crate) my_channel: String,
    /// `{p}:node:`, the prefix of registry records (the Lua scripts append the node id).
    pub(crate) node_prefix: String,
    pub(crate) nodes: String,
    /// `{p}:epoch`, the stream epoch (see `epochs.rs`).
    pub(crate) epoch: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, node_id: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            bus_all: format!("{prefix}:bus:all"),
            my_channel: format!("{prefix}:bus:node:{node_id}"),
            node_prefix: format!("{prefix}:node:"),
            nodes: format!("{prefix}:nodes"),
            epoch: format!("{prefix}:epoch"),
        }
    }

    pub(crate) fn node_channel(&self, node_id: &str) -> String {
        format!("{}:bus:node:{node_id}", self.prefix)
    }

    pub(crate) fn node(&self, node_id: &str) -> String {
        format!("{}{node_id}", self.node_prefix)
    }

    pub(crate) fn tag(&self, tag: u16) -> String {
        format!("{}:tag:{tag}", self.prefix)
    }

    pub(crate) fn presence(&self, user: &str) -> String {
        format!("{}:presence:{user}", self.prefix)
    }

    /// The stream counter of a user.
    pub(crate) fn seq(&self, user: &str) -> String {
        format!("{}:seq:{user}", self.prefix)
    }

    /// A session for fast reconnect.
    pub(crate) fn session(&self, id: &str) -> String {
        format!("{}:session:{id}", self.prefix)
    }
}
