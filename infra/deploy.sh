#!/usr/bin/env bash
# Deploy (or update) rtpd in one region: bicep/main.bicep with the region's
# parameter file, into an existing resource group. See docs/deploy.md.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: infra/deploy.sh <primary|secondary> <resource-group> <image> [--what-if]

  <image>     rtpd image to run, e.g. myregistry.azurecr.io/rtpd:1.4.0
  --what-if   show what would change; deploy nothing

environment:
  DEPLOY_DOWNSTREAM_URL     required: URL of the downstream payment service
  DEPLOY_REGISTRY_NAME      Azure Container Registry holding <image> (e.g. myregistry);
                            the app identity gets AcrPull on it. Unset for a public image
  DEPLOY_REGISTRY_RESOURCE_GROUP
                            resource group of that registry (default: <resource-group>)
  DEPLOY_VENDOR_KEYS_FILE   file with the vendor credentials; required on the
                            first deployment, stored in Key Vault as vendor-keys
  DEPLOY_ADMIN_TOKENS_FILE  file with the admin tokens; required on the first
                            deployment, stored in Key Vault as admin-tokens
  DEPLOY_LEDGER             redis (default) or postgres
  DEPLOY_POSTGRES_ADMIN_OBJECT_ID, DEPLOY_POSTGRES_ADMIN_NAME
                            required with DEPLOY_LEDGER=postgres: the Entra group (object
                            id, display name) administering the PostgreSQL server
  DEPLOY_ALERT_ACTION_GROUP_ID
                            resource id of an action group the alerts notify (optional)
  DEPLOY_TRUSTED_PROXIES    the ingress proxy's address range(s), comma separated
                            (optional; docs/security.md, "Behind a proxy")
EOF
  exit 2
}

die() {
  echo "deploy.sh: $*" >&2
  exit 1
}

[[ $# -ge 3 && $# -le 4 ]] || usage
region=$1
resource_group=$2
image=$3
what_if=false
if [[ $# -eq 4 ]]; then
  [[ $4 == --what-if ]] || usage
  what_if=true
fi

case $region in
  primary | secondary) ;;
  *) usage ;;
esac

infra_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
param_file="$infra_dir/main.$region.bicepparam"
[[ -f $param_file ]] || die "missing parameter file $param_file"

command -v az >/dev/null || die "the Azure CLI (az) is not installed"
[[ -n ${DEPLOY_DOWNSTREAM_URL:-} ]] || die "set DEPLOY_DOWNSTREAM_URL to the downstream payment service URL"
az group show --name "$resource_group" --output none 2>/dev/null ||
  die "resource group '$resource_group' not found; create it first: az group create --name $resource_group --location <region>"

export DEPLOY_LEDGER=${DEPLOY_LEDGER:-redis}
case $DEPLOY_LEDGER in
  redis) ;;
  postgres)
    [[ -n ${DEPLOY_POSTGRES_ADMIN_OBJECT_ID:-} && -n ${DEPLOY_POSTGRES_ADMIN_NAME:-} ]] ||
      die "DEPLOY_LEDGER=postgres needs DEPLOY_POSTGRES_ADMIN_OBJECT_ID and DEPLOY_POSTGRES_ADMIN_NAME (the Entra administrator group)"
    ;;
  *) die "DEPLOY_LEDGER must be redis or postgres, not '$DEPLOY_LEDGER'" ;;
esac
export DEPLOY_POSTGRES_ADMIN_OBJECT_ID=${DEPLOY_POSTGRES_ADMIN_OBJECT_ID:-}
export DEPLOY_POSTGRES_ADMIN_NAME=${DEPLOY_POSTGRES_ADMIN_NAME:-}
export DEPLOY_ALERT_ACTION_GROUP_ID=${DEPLOY_ALERT_ACTION_GROUP_ID:-}
export DEPLOY_TRUSTED_PROXIES=${DEPLOY_TRUSTED_PROXIES:-}

# The parameter file reads these with readEnvironmentVariable().
export DEPLOY_IMAGE=$image
export DEPLOY_DOWNSTREAM_URL
export DEPLOY_REGISTRY_NAME=${DEPLOY_REGISTRY_NAME:-}
export DEPLOY_REGISTRY_RESOURCE_GROUP=${DEPLOY_REGISTRY_RESOURCE_GROUP:-}
DEPLOY_VENDOR_KEYS=""
DEPLOY_ADMIN_TOKENS=""
if [[ -n ${DEPLOY_VENDOR_KEYS_FILE:-} ]]; then
  DEPLOY_VENDOR_KEYS=$(<"$DEPLOY_VENDOR_KEYS_FILE")
fi
if [[ -n ${DEPLOY_ADMIN_TOKENS_FILE:-} ]]; then
  DEPLOY_ADMIN_TOKENS=$(<"$DEPLOY_ADMIN_TOKENS_FILE")
fi
export DEPLOY_VENDOR_KEYS DEPLOY_ADMIN_TOKENS

deployment_name="rtpd-$region-$(date -u +%Y%m%d%H%M%S)"

if $what_if; then
  az deployment group what-if \
    --name "$deployment_name" \
    --resource-group "$resource_group" \
    --parameters "$param_file"
  exit 0
fi

echo "deploying $image to $resource_group ($region) as $deployment_name" >&2
az deployment group create \
  --name "$deployment_name" \
  --resource-group "$resource_group" \
  --parameters "$param_file" \
  --query properties.outputs \
  --output json
