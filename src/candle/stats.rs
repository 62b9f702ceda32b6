//! [`RoutingStats`]: what a layer's last forward routed, from what the forward computed anyway.

/// The routing of a layer's last forward ([`MoeLayer::routing_stats`](super::MoeLayer::routing_stats)).
///
/// Every figure comes from what the forward computes in any case (the routing statistics the
/// kernels write for the compaction and the regulariser): no extra router matmul. On CUDA the
/// forward copies them on the device into the layer (E + 3 words, no host read); asking for them
/// is the one host read, and it waits for the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingStats {
    /// T, the tokens of the forward.
    pub tokens: usize,
    /// |A|, the (token, expert) pairs computed.
    pub active_pairs: usize,
    /// S = 1 - |A| / (T E) (1 for T = 0): what the adaptive lambda steers.
    pub sparsity: f64,
    /// The balance loss's value at the forward's coefficient (ReMoE's regulariser, TopK's aux
    /// loss); its gradient is already in the layer's backward.
    pub balance_loss: f64,
    /// n_e, the tokens each expert received.
    pub tokens_per_expert: Vec<u32>,
    /// The mean number of experts a token went to, |A| / T (0 for T = 0). k exactly for TopK.
    pub mean_active_experts: f64,
    /// How many tokens went to 0, 1, ..., E experts (E + 1 entries). The CPU path only: the
    /// kernels count pairs per expert, not per token, so on CUDA this is `None` (a per-token
    /// count would be an extra pass over the \[T, E\] gates).
    pub active_experts_histogram: Option<Vec<u64>>,
}
