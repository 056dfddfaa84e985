//! The RPCs of the inference service, as one type: metric labels, span
//! names and log fields come from it, so a new RPC cannot be miscounted
//! under another's name.

/// One method of `rigger.inference.v1.InferenceService`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    EnhanceTask,
    DecomposeTask,
    Generate,
    GetStatus,
    ListModels,
    LoadModel,
    UnloadModel,
}

impl Rpc {
    /// Label value in metrics and logs (snake case, as Prometheus labels
    /// usually are).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EnhanceTask => "enhance_task",
            Self::DecomposeTask => "decompose_task",
            Self::Generate => "generate",
            Self::GetStatus => "get_status",
            Self::ListModels => "list_models",
            Self::LoadModel => "load_model",
            Self::UnloadModel => "unload_model",
        }
    }

    /// The method's name in the proto, as gRPC paths and spans name it.
    pub fn method(self) -> &'static str {
        match self {
            Self::EnhanceTask => "EnhanceTask",
            Self::DecomposeTask => "DecomposeTask",
            Self::Generate => "Generate",
            Self::GetStatus => "GetStatus",
            Self::ListModels => "ListModels",
            Self::LoadModel => "LoadModel",
            Self::UnloadModel => "UnloadModel",
        }
    }

    /// `service/method`, as a call's SERVER span is named: a constant, so
    /// naming a call's span allocates nothing.
    pub fn path(self) -> &'static str {
        match self {
            Self::EnhanceTask => "rigger.inference.v1.InferenceService/EnhanceTask",
            Self::DecomposeTask => "rigger.inference.v1.InferenceService/DecomposeTask",
            Self::Generate => "rigger.inference.v1.InferenceService/Generate",
            Self::GetStatus => "rigger.inference.v1.InferenceService/GetStatus",
            Self::ListModels => "rigger.inference.v1.InferenceService/ListModels",
            Self::LoadModel => "rigger.inference.v1.InferenceService/LoadModel",
            Self::UnloadModel => "rigger.inference.v1.InferenceService/UnloadModel",
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
    fn the_rpcs_are_the_methods_of_the_service() {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        let methods: Vec<String> = pool
            .get_service_by_name(InferenceServiceServer::<InferenceApi>::NAME)
            .expect("the service is in the descriptor set")
            .methods()
            .map(|method| method.name().to_owned())
            .collect();
        let rpcs = [
            Rpc::EnhanceTask,
            Rpc::DecomposeTask,
            Rpc::Generate,
            Rpc::GetStatus,
            Rpc::ListModels,
            Rpc::LoadModel,
            Rpc::UnloadModel,
        ];
        assert_eq!(methods, rpcs.map(Rpc::method));
        for rpc in rpcs {
            assert_eq!(
                rpc.path(),
                format!(
                    "{}/{}",
                    InferenceServiceServer::<InferenceApi>::NAME,
                    rpc.method()
                )
            );
        }
        let labels: std::collections::BTreeSet<&str> =
            rpcs.iter().map(|rpc| rpc.as_str()).collect();
        assert_eq!(labels.len(), rpcs.len(), "labels are distinct");
    }
}
