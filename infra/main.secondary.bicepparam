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

// Warm standby: as many API replicas as the primary so it can take its load at once.
param apiMinReplicas = 2
param processorMinReplicas = 1
