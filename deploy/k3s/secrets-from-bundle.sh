#!/usr/bin/env bash
# The Secrets and ConfigMaps the manifests mount, from a `p2pdoe provision` bundle and, optionally,
# the configurations of `p2pdoe site-config`; YAML on stdout, for kubectl:
#   secrets-from-bundle.sh BUNDLE_DIR [CONFIG_DIR] | kubectl apply -f -
# Writes nothing else and refuses to write to a terminal. The CA's private key never leaves the
# bundle, nor does the monitor's password. Each identity's Secret holds its password and its signing
# key (keys/<username>.key); the public keys of all (keys/public-keys.json) are a ConfigMap. Sites
# revoked from the bundle (`p2pdoe provision --revoke`) get nothing.
set -euo pipefail

NAMESPACE=p2pdoe
PART_OF=app.kubernetes.io/part-of=p2pdoe

die() {
    printf 'secrets-from-bundle: %s\n' "$*" >&2
    exit 2
}

# One object: `kubectl create ... --dry-run=client -o yaml`, labelled, after a document separator.
emit() {
    local namespace=$1
    shift
    printf -- '---\n'
    kubectl create "$@" --namespace "$namespace" --dry-run=client -o yaml |
        kubectl label --local -f - "$PART_OF" -o yaml
}

[[ $# -ge 1 && $# -le 2 ]] || die "usage: secrets-from-bundle.sh BUNDLE_DIR [CONFIG_DIR] | kubectl apply -f -"
bundle=$1
config=${2:-}
[[ -f $bundle/provision.json ]] || die "$bundle is not a p2pdoe bundle (no provision.json)"
[[ -f $bundle/keys/public-keys.json && -f $bundle/keys/dso.key ]] ||
    die "$bundle has no signing keys (keys/): provision a new bundle with this version of p2pdoe"
[[ -z $config || -f $config/coordinator.json ]] || die "$config holds no coordinator.json (p2pdoe site-config --out)"
[[ ! -t 1 ]] || die "refusing to print secrets to a terminal: pipe into 'kubectl apply -f -' or redirect to a file"
command -v kubectl >/dev/null || die "kubectl is not on PATH"

# The broker's host and port, from the listener line of the bundle's broker configuration.
host='' port=''
while read -r key value rest; do
    if [[ $key == listener ]]; then
        port=$value host=$rest
    fi
done <"$bundle/broker/mosquitto.conf"
[[ -n $host && -n $port ]] || die "$bundle/broker/mosquitto.conf has no 'listener PORT HOST' line"

# The sites, each one's files checked before anything is printed (kubectl would apply a part).
sites=()
for file in "$bundle"/identities/edge-*.password; do
    [[ -f $file ]] || continue
    site=${file##*/edge-}
    site=${site%.password}
    [[ $site =~ ^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$ ]] || die "site id '$site' cannot name Kubernetes objects"
    [[ -f $bundle/keys/edge-$site.key ]] || die "$bundle/keys/edge-$site.key is missing"
    [[ -z $config || -f $config/sites/$site.json ]] || die "$config/sites/$site.json is missing"
    sites+=("$site")
done
((${#sites[@]} > 0)) || die "$bundle/identities holds no site (edge-*.password)"

emit "$NAMESPACE" secret generic mosquitto-auth \
    --from-file=passwd="$bundle/broker/passwd" --from-file=acl="$bundle/broker/acl"
emit "$NAMESPACE" secret generic mosquitto-tls --from-file=ca.crt="$bundle/ca/ca.crt" \
    --from-file=server.crt="$bundle/broker/server.crt" --from-file=server.key="$bundle/broker/server.key"
emit "$NAMESPACE" configmap p2pdoe-ca --from-file=ca.crt="$bundle/ca/ca.crt"
emit "$NAMESPACE" configmap p2pdoe-public-keys --from-file=public-keys.json="$bundle/keys/public-keys.json"
emit "$NAMESPACE" configmap p2pdoe-broker --from-literal=host="$host" --from-literal=port="$port"
emit "$NAMESPACE" secret generic p2pdoe-dso --from-file=password="$bundle/identities/dso.password" \
    --from-file=signing-key="$bundle/keys/dso.key"
if [[ -n $config ]]; then
    emit "$NAMESPACE" configmap coordinator-config --from-file=coordinator.json="$config/coordinator.json"
fi

for site in "${sites[@]}"; do
    emit "$NAMESPACE" secret generic "edge-$site" --from-file=password="$bundle/identities/edge-$site.password" \
        --from-file=signing-key="$bundle/keys/edge-$site.key"
    if [[ -n $config ]]; then
        emit "$NAMESPACE" configmap "site-$site" --from-file=site.json="$config/sites/$site.json"
    fi
done

# Pods resolve the certificate's name to the broker's Service (k3s imports coredns-custom's
# *.override into CoreDNS), so in-cluster clients and outside ones use one name. Not needed for an
# IP address or the Service's own name.
if [[ ! $host =~ ^[0-9.]+$ && $host != *:* && $host != *.svc && $host != *.svc.cluster.local ]]; then
    service=mosquitto.$NAMESPACE.svc.cluster.local
    rule=$(printf 'rewrite stop {\n    name regex ^%s\\.$ %s.\n    answer name ^%s\\.$ %s.\n}\n' \
        "${host//./\\.}" "$service" "${service//./\\.}" "$host")
    emit kube-system configmap coredns-custom --from-literal=p2pdoe.override="$rule"
fi
