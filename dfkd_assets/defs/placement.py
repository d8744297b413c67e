"""Where GPU steps run when the pipeline scales out. The same tags are inert on one machine.

- Kubernetes (`k8s_job_executor` / `K8sRunLauncher`, dagster-k8s): each GPU step's pod asks for
  one `nvidia.com/gpu`, so the cluster scheduler places it on a GPU node.
- Celery (`celery_executor`, dagster-celery): GPU steps go to the `gpu` queue, served by workers
  started on GPU machines with `-q gpu`; other steps use the default queue.
"""

GPU_OP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "4", "memory": "32Gi"}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
    "dagster-celery/queue": "gpu",
}
