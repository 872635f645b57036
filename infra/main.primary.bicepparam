// Primary region. Deploy with: infra/deploy.sh primary <resource-group> <image>
// Values read from the environment are set by infra/deploy.sh (see its usage).
using '../bicep/main.bicep'

param location = 'eastus2'

param image = readEnvironmentVariable('DEPLOY_IMAGE')
param registryName = readEnvironmentVariable('DEPLOY_REGISTRY_NAME', '')
param registryResourceGroup = readEnvironmentVariable('DEPLOY_REGISTRY_RESOURCE_GROUP', '')
param downstreamUrl = readEnvironmentVariable('DEPLOY_DOWNSTREAM_URL')

// Written to Key Vault only when non-empty (first deployment, or rotation).
param vendorKeys = readEnvironmentVariable('DEPLOY_VENDOR_KEYS', '')
param adminTokens = readEnvironmentVariable('DEPLOY_ADMIN_TOKENS', '')

param storageSku = 'Standard_RAGZRS'
param serviceBusSku = 'Standard'
param redisSku = 'Balanced_B1'

param apiMinReplicas = 2
param processorMinReplicas = 1
