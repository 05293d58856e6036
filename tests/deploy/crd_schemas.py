"""Structural JSON schemas of the custom resources the deployment uses.

kubernetes-validate bundles the schemas of Kubernetes' built-in kinds only. These cover the fields
of KEDA's ScaledObject (keda.sh/v1alpha1) and the Prometheus Operator's ServiceMonitor and
PrometheusRule (monitoring.coreos.com/v1) that the manifests use, written from their CRDs: unknown
fields are refused, as the API server's structural schemas would prune or refuse them.
"""

from __future__ import annotations

from typing import Any

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                   "labels": _STRING_MAP, "annotations": _STRING_MAP},
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": _METADATA, "spec": spec},
    }


SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", {
    "type": "object",
    "required": ["scaleTargetRef", "triggers"],
    "additionalProperties": False,
    "properties": {
        "scaleTargetRef": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                           "apiVersion": {"type": "string"}, "envSourceContainerName": {"type": "string"}},
        },
        "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "idleReplicaCount": {"type": "integer", "minimum": 0},
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": {"type": "integer", "minimum": 0},
        "initialCooldownPeriod": {"type": "integer", "minimum": 0},
        "fallback": {"type": "object", "required": ["failureThreshold", "replicas"]},
        "advanced": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                },
                "scalingModifiers": {
                    "type": "object", "required": ["formula", "target"], "additionalProperties": False,
                    "properties": {"formula": {"type": "string", "minLength": 1},
                                   "target": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
                                   "activationTarget": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
                                   "metricType": {"enum": ["AverageValue", "Value"]}},
                },
            },
        },
        "triggers": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "minLength": 1},
                    "name": {"type": "string"},
                    "useCachedMetrics": {"type": "boolean"},
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    # KEDA's trigger metadata is a map of strings: a bare number or boolean is refused.
                    "metadata": _STRING_MAP,
                    "authenticationRef": {
                        "type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"name": {"type": "string"},
                                       "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                    },
                },
            },
        },
    },
})

SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "required": ["selector", "endpoints"],
    "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": _STRING_MAP}},
        "namespaceSelector": {"type": "object"},
        "jobLabel": {"type": "string"},
        "endpoints": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "additionalProperties": False,
                "properties": {"port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                               "path": {"type": "string", "pattern": "^/"}, "interval": _DURATION,
                               "scrapeTimeout": _DURATION, "scheme": {"enum": ["http", "https"]},
                               "honorLabels": {"type": "boolean"}, "relabelings": {"type": "array"},
                               "metricRelabelings": {"type": "array"}, "params": {"type": "object"}},
            },
        },
    },
})

_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {"alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": "string"},
                   "for": _DURATION, "keep_firing_for": _DURATION, "labels": _STRING_MAP,
                   "annotations": _STRING_MAP},
}

PROMETHEUS_RULE = _resource("monitoring.coreos.com/v1", "PrometheusRule", {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "required": ["name", "rules"], "additionalProperties": False,
                      "properties": {"name": {"type": "string"}, "interval": _DURATION,
                                     "rules": {"type": "array", "items": _RULE}}},
        },
    },
})

# (apiVersion, kind) -> schema
CUSTOM_RESOURCE_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
