// Secondary (standby) region: a complete, independent stack with its own WAL,
// queue and ledger, taking traffic only after a failover (docs/deploy.md).
// Deploy with: infra/deploy.sh secondary <resource-group> <image>
using '../bicep/main.bicep'

param location = 'centralus'

param image = readEnvironmentVariable('DEPLOY_IMAGE')
param registryName = readEnvironmentVariable('DEPLOY_REGISTRY_NAME', '')
param registryResourceGroup = readEnvironmentVariable('DEPLOY_REGISTRY_RESOURCE_GROUP', '')
param downstreamUrl = readEnvironmentVariable('DEPLOY_DOWNSTREAM_URL')

param vendorKeys = readEnvironmentVariable('DEPLOY_VENDOR_KEYS', '')
param adminTokens = readEnvironmentVariable('DEPLOY_ADMIN_TOKENS', '')

param storageSku = 'Standard_RAGZRS'
param serviceBusSku = 'Standard'
param redisSku = 'Balanced_B1'

// Ledger: 'redis' (Azure Managed Redis) or 'postgres' (Flexible Server, zone-redundant
// HA, Entra ID only). For postgres also set the Entra administrator (a group of
// operators) and run the one-time role step in docs/deploy.md after the first deployment.
param ledger = readEnvironmentVariable('DEPLOY_LEDGER', 'redis')
param postgresAdminObjectId = readEnvironmentVariable('DEPLOY_POSTGRES_ADMIN_OBJECT_ID', '')
param postgresAdminName = readEnvironmentVariable('DEPLOY_POSTGRES_ADMIN_NAME', '')

// Vendor ingress (docs/security.md, "Vendor ingress"): source ranges allowed to reach
// the api, e.g. [{ name: 'acme', ipAddressRange: '203.0.113.0/24', description: 'Acme egress' }],
// and the client-certificate mode (ignore | accept | require).
param apiIpAllowList = []
param apiClientCertificateMode = 'ignore'

// The ingress proxy's address range (docs/security.md, "Behind a proxy"): behind
// it the per-address limits key on the client's X-Forwarded-For address. Empty:
// they key on the proxy, which every vendor shares. Set it for each environment.
param apiTrustedProxies = readEnvironmentVariable('DEPLOY_TRUSTED_PROXIES', '')

// Alerts notify this action group (resource id); empty: portal only.
param alertActionGroupId = readEnvironmentVariable('DEPLOY_ALERT_ACTION_GROUP_ID', '')

// Warm standby: as many API replicas as the primary so it can take its load at once.
param apiMinReplicas = 2
param processorMinReplicas = 1
