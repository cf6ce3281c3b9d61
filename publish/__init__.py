"""Publishing: what operates on a live model repository and Triton. Version numbers, manifests
and pruning (repository), the publish lock and journal, loading models (model_control), the hot
swap with rollback, retention of unused exports, and `fluxserve-export` (cli). export/ builds
the artifacts; this package writes them where Triton serves them."""
