"""Where GPU steps run when the pipeline scales out. The same tags are inert on one machine.

- Kubernetes (`k8s_job_executor` / `K8sRunLauncher`, dagster-k8s): each GPU step's pod asks for
  one `nvidia.com/gpu`, is placed on a GPU node (node selector `nvidia.com/gpu.present`, the label
  NVIDIA's GPU feature discovery sets; the usual GPU-node taint tolerated), and mounts the two
  shared volumes: the data volume (`data/`, and on it the Inductor cache every GPU step shares,
  `TORCHINDUCTOR_CACHE_DIR`) and the weights, read-only, where the settings expect them.
- Celery (dfkd's `celery` executor over dagster-celery): GPU steps go to the `gpu` queue, served
  by workers started on GPU machines with `-q gpu`; other steps use the `dagster` queue.
"""

K8S_ROOT = "/opt/dfkd"  # the image's working directory (infra/k8s/Dockerfile)
K8S_DATA_CLAIM, K8S_WEIGHTS_CLAIM = "dfkd-data", "dfkd-weights"  # ReadWriteMany PVCs shared by all steps
K8S_INDUCTOR_CACHE = f"{K8S_ROOT}/data/cache/inductor"

GPU_OP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "4", "memory": "32Gi"}},
            "env": [{"name": "TORCHINDUCTOR_CACHE_DIR", "value": K8S_INDUCTOR_CACHE}],
            "volume_mounts": [
                {"name": "dfkd-data", "mount_path": f"{K8S_ROOT}/data"},
                {"name": "dfkd-weights", "mount_path": f"{K8S_ROOT}/storage/weights", "read_only": True},
            ],
        },
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "volumes": [
                {"name": "dfkd-data", "persistent_volume_claim": {"claim_name": K8S_DATA_CLAIM}},
                {"name": "dfkd-weights", "persistent_volume_claim": {"claim_name": K8S_WEIGHTS_CLAIM, "read_only": True}},
            ],
        },
    },
    "dagster-celery/queue": "gpu",
}


def gpu_asset(**kwargs):
    """`@dg.asset` of a step that holds a device: the `gpu` pool (one slot per GPU, dfkd setup-pools),
    the placement tags above, and errors caused by settings or files never retried
    (defs/errors.no_retry_for_bad_input). Every GPU asset opens with this one preamble."""
    import dagster as dg

    from dfkd_assets.defs.errors import no_retry_for_bad_input

    def wrap(fn):
        return dg.asset(pool="gpu", op_tags=GPU_OP_TAGS, **kwargs)(no_retry_for_bad_input(fn))

    return wrap
