"""How the Ingress calls the Retrieval replicas: Serve's gRPC transport with plain pickle.

The transport itself runs in every e2e feed (tests/e2e); here, without Ray, the options and
the payloads: Serve accepts the options, and what a Retrieval call sends and returns survives
the standard library's pickle, which (unlike cloudpickle) refuses lambdas and local classes.
"""

from __future__ import annotations

import numpy as np
from ray.serve._private.handle_options import DynamicHandleOptions
from ray.serve._private.serialization import RPCSerializer

from feedrec.features.tables import USER_CONTENT_STATS, USER_STATS, USER_TOPIC_STATS
from feedrec.runtime.ray_cluster import HANDLE_OPTIONS
from feedrec.serving.online_store import UserFeatures


def _viewer() -> UserFeatures:
    rng = np.random.default_rng(0)
    return UserFeatures(
        user_id=42,
        stats=rng.random(len(USER_STATS), dtype=np.float32),
        topics=np.array([1, 5, 9], np.int64),
        topic_stats=rng.random((3, len(USER_TOPIC_STATS)), dtype=np.float32),
        follows=np.array([3, 8], np.int64),
        seen=np.arange(100, 160, dtype=np.int64),
        hidden=np.zeros(0, np.int64),
        liked_content=rng.random(len(USER_CONTENT_STATS), dtype=np.float32),
    )


def test_a_handle_built_for_actor_calls_is_switched_to_grpc_and_pickle() -> None:
    # What a driver that imported Serve before init_ray hands the Ingress.
    built = DynamicHandleOptions(_by_reference=True)
    used = built.copy_and_update(**HANDLE_OPTIONS)  # what DeploymentHandle.options applies
    assert used._by_reference is False
    assert (used.request_serialization, used.response_serialization) == ("pickle", "pickle")


def test_a_retrieval_call_and_its_reply_survive_the_transport() -> None:
    serializer = RPCSerializer.get_cached_serializer(
        HANDLE_OPTIONS["request_serialization"], HANDLE_OPTIONS["response_serialization"]
    )
    viewer = _viewer()
    args = serializer.loads_request(serializer.dumps_request((viewer, 1000, [7, 11])))
    assert args[0].to_bytes() == viewer.to_bytes()
    assert args[1:] == (1000, [7, 11])
    reply = ([int(p) for p in np.arange(1000)], {"seen": 12, "followed": 3}, "v3")
    assert serializer.loads_response(serializer.dumps_response(reply)) == reply
