//! The RPCs of the inference service, as one type: metric labels, span
//! names and log fields come from it, so a new RPC cannot be miscounted
//! under another's name.

/// One method of `rigger.inference.v1.InferenceService`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    EnhanceTask,
    DecomposeTask,
    Generate,
}

impl Rpc {
    /// Label value in metrics and logs (snake case, as Prometheus labels
    /// usually are).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EnhanceTask => "enhance_task",
            Self::DecomposeTask => "decompose_task",
            Self::Generate => "generate",
        }
    }

    /// The method's name in the proto, as gRPC paths and spans name it.
    pub fn method(self) -> &'static str {
        match self {
            Self::EnhanceTask => "EnhanceTask",
            Self::DecomposeTask => "DecomposeTask",
            Self::Generate => "Generate",
        }
    }
}

#[cfg(test)]
mod tests {
    use prost_reflect::DescriptorPool;
    use tonic::server::NamedService;

    use super::*;
    use crate::{
        proto::{self, inference_service_server::InferenceServiceServer},
        server::InferenceApi,
    };

    #[test]
    fn every_rpc_is_a_method_of_the_service() {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        let methods: std::collections::BTreeSet<String> = pool
            .get_service_by_name(InferenceServiceServer::<InferenceApi>::NAME)
            .expect("the service is in the descriptor set")
            .methods()
            .map(|method| method.name().to_owned())
            .collect();
        let rpcs = [Rpc::EnhanceTask, Rpc::DecomposeTask, Rpc::Generate];
        for rpc in rpcs {
            assert!(methods.contains(rpc.method()), "{rpc:?}");
        }
        let labels: std::collections::BTreeSet<&str> =
            rpcs.iter().map(|rpc| rpc.as_str()).collect();
        assert_eq!(labels.len(), rpcs.len(), "labels are distinct");
    }
}
