// rtp-durability on Azure Container Apps, one region per deployment.
//
//   vendor --HTTPS--> api --> Blob WAL (WORM) + ledger (Managed Redis or PostgreSQL) + Service Bus queue
//                              processor <-- queue --> downstream payment service
//
// Deploy with infra/deploy.sh and a parameter file (infra/main.<region>.bicepparam);
// see docs/deploy.md. Every data-plane credential is the app's managed identity.
// Every resource's api-version is one whose published schema
// tests/deploy/check_deploy.py validates the resource against.

targetScope = 'resourceGroup'

// ---------------------------------------------------------------- region, image

@description('Region of every resource; defaults to the resource group\'s.')
param location string = resourceGroup().location

@description('rtpd container image, e.g. myregistry.azurecr.io/rtpd:1.4.0.')
param image string

@description('Azure Container Registry holding the image; the app identity is granted AcrPull on it. Empty for a public image.')
param registryName string = ''

@description('Resource group of that registry; empty means this resource group.')
param registryResourceGroup string = ''

@description('URL of the downstream payment service the processor calls.')
param downstreamUrl string

// ---------------------------------------------------------------- names

@description('Lower-case short name that resource names are built from.')
@minLength(2)
@maxLength(8)
param prefix string = 'rtpd'

@description('Makes globally unique names unique; stable for a given resource group.')
param uniqueSuffix string = uniqueString(resourceGroup().id)

param logAnalyticsName string = 'log-${prefix}-${uniqueSuffix}'
param appInsightsName string = 'appi-${prefix}-${uniqueSuffix}'
param environmentName string = 'cae-${prefix}-${uniqueSuffix}'
param appIdentityName string = 'id-${prefix}-app'
param scalerIdentityName string = 'id-${prefix}-scaler'

@maxLength(24)
param storageAccountName string = take('st${toLower(prefix)}${uniqueSuffix}', 24)

param serviceBusNamespaceName string = 'sb-${prefix}-${uniqueSuffix}'
param redisName string = 'redis-${prefix}-${uniqueSuffix}'
param postgresServerName string = 'psql-${prefix}-${uniqueSuffix}'

@maxLength(24)
param keyVaultName string = take('kv-${prefix}-${uniqueSuffix}', 24)

param apiAppName string = 'ca-${prefix}-api'
param processorAppName string = 'ca-${prefix}-processor'
param metricsCollectorAppName string = 'ca-${prefix}-otelcol'

// ---------------------------------------------------------------- SKUs

@description('Geo-zone-redundant storage for the WAL; RA-GZRS also allows reads in the paired region.')
@allowed([
  'Standard_GZRS'
  'Standard_RAGZRS'
])
param storageSku string = 'Standard_RAGZRS'

@description('Standard or Premium: both support duplicate detection; Premium adds isolation and capacity.')
@allowed([
  'Standard'
  'Premium'
])
param serviceBusSku string = 'Standard'

@description('Azure Managed Redis SKU (ledger = redis).')
param redisSku string = 'Balanced_B1'

// ---------------------------------------------------------------- ledger

@description('Where the ledger lives: Azure Managed Redis (rebuildable from the WAL and the outcome journal) or Azure Database for PostgreSQL Flexible Server (ACID, point-in-time restore). Only the chosen one is deployed.')
@allowed([
  'redis'
  'postgres'
])
param ledger string = 'redis'

@description('PostgreSQL compute SKU (ledger = postgres). Zone-redundant HA needs General Purpose or Memory Optimized.')
param postgresSkuName string = 'Standard_D2ds_v5'

@allowed([
  'GeneralPurpose'
  'MemoryOptimized'
])
param postgresSkuTier string = 'GeneralPurpose'

@description('PostgreSQL major version.')
param postgresVersion string = '17'

@minValue(32)
param postgresStorageGb int = 128

@description('Object id of the Entra user or group that administers the PostgreSQL server (ledger = postgres). It runs the one-time role creation in docs/deploy.md; rtpd never gets admin rights.')
param postgresAdminObjectId string = ''

@description('Display name (user principal name for a user) of that administrator.')
param postgresAdminName string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param postgresAdminType string = 'Group'

// ---------------------------------------------------------------- WAL

param walContainerName string = 'rtp-wal'

@description('Days a WAL segment stays immutable after it is written.')
@minValue(1)
param walImmutabilityDays int = 30

@description('Soft-delete retention for blobs and containers, in days.')
@minValue(1)
@maxValue(365)
param blobSoftDeleteDays int = 14

// ---------------------------------------------------------------- queue
// Keep in step with infra/servicebus-emulator/Config.json (tests/deploy/check_deploy.py).

param queueName string = 'rtp-transactions'

@description('Deliveries before Service Bus dead-letters a message. rtpd schedules its own retries as new messages, so this only counts crashes mid-processing. At most 10 to match the emulator.')
@minValue(1)
@maxValue(10)
param queueMaxDeliveryCount int = 10

@description('Peek-lock duration in seconds; also given to rtpd as RTPD_LOCK_DURATION_SECS.')
@minValue(5)
@maxValue(300)
param queueLockDurationSecs int = 60

@description('Duplicate detection window (ISO 8601). Message ids are transaction ids.')
param queueDuplicateDetectionWindow string = 'PT10M'

// ---------------------------------------------------------------- rtpd

@description('Retries before dead-letter (design default 5).')
param maxRetries int = 5

param backoffBaseSecs int = 60
param backoffMaxSecs int = 3600

@allowed([
  'error'
  'warn'
  'info'
  'debug'
  'trace'
])
param logLevel string = 'info'

@description('Vendor credentials, stored in Key Vault as `vendor-keys` and mounted into the api as a file. Required on the first deployment; leave empty afterwards to keep the stored value.')
@secure()
param vendorKeys string = ''

@description('Admin tokens, stored in Key Vault as `admin-tokens` and mounted as a file. Same rule as vendorKeys.')
@secure()
param adminTokens string = ''

// ---------------------------------------------------------------- vendor ingress

@description('Source addresses allowed to reach the api, as { name, ipAddressRange (CIDR), description }. Empty: open to the internet (vendors still authenticate).')
param apiIpAllowList array = []

@description('Given to the api as RTPD_TRUSTED_PROXIES: the addresses or CIDR ranges the platform\'s ingress (Envoy) connects from, comma separated — for a VNet-integrated environment its infrastructure subnet range. rtpd then keys its per-address limits on the client address Envoy appends to X-Forwarded-For instead of on Envoy. Empty: every caller has Envoy\'s address (docs/security.md, "Behind a proxy").')
param apiTrustedProxies string = ''

@description('Client certificates (mTLS) at the api\'s ingress: ignore, accept (optional), require. The platform accepts any well-formed certificate, self-signed included, and only forwards it; see docs/security.md.')
@allowed([
  'ignore'
  'accept'
  'require'
])
param apiClientCertificateMode string = 'ignore'

// ---------------------------------------------------------------- scale

@minValue(2)
param apiMinReplicas int = 2
param apiMaxReplicas int = 10
param apiConcurrentRequests int = 100

@minValue(1)
param processorMinReplicas int = 1
param processorMaxReplicas int = 10

@description('Queue messages per processor replica that KEDA scales towards.')
param processorMessagesPerReplica int = 50

// ---------------------------------------------------------------- observability

@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

@description('Deploy the small OpenTelemetry Collector app that forwards rtpd\'s OTLP metrics to Application Insights (the environment\'s managed agent carries traces and logs only). Without it the oldest-pending alert has no data.')
param deployMetricsCollector bool = true

@description('OpenTelemetry Collector (contrib) image for the metrics collector; mirror it into your registry for production.')
param metricsCollectorImage string = 'otel/opentelemetry-collector-contrib:0.131.0'

@description('Resource id of an existing action group the alerts notify; empty: alerts fire in the portal only.')
param alertActionGroupId string = ''

@description('Alert when the oldest pending transaction is older than this many seconds.')
@minValue(60)
param oldestPendingAlertSecs int = 900

@description('Alert when more than this percentage of transaction POSTs in 5 minutes are answered 5xx (rtpd_ingest_requests).')
@minValue(1)
@maxValue(100)
param http5xxAlertPercent int = 5

// ---------------------------------------------------------------- resources

module identity './modules/identity.bicep' = {
  name: 'identity'
  params: {
    location: location
    appIdentityName: appIdentityName
    scalerIdentityName: scalerIdentityName
  }
}

module monitoring './modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    logAnalyticsName: logAnalyticsName
    appInsightsName: appInsightsName
    logRetentionDays: logRetentionDays
  }
}

module containerEnvironment './modules/environment.bicep' = {
  name: 'environment'
  params: {
    location: location
    environmentName: environmentName
    logAnalyticsName: monitoring.outputs.logAnalyticsName
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
  }
}

module storage './modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    name: storageAccountName
    sku: storageSku
    walContainerName: walContainerName
    walImmutabilityDays: walImmutabilityDays
    softDeleteDays: blobSoftDeleteDays
    appPrincipalId: identity.outputs.appPrincipalId
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsId
  }
}

module serviceBus './modules/servicebus.bicep' = {
  name: 'servicebus'
  params: {
    location: location
    name: serviceBusNamespaceName
    sku: serviceBusSku
    queueName: queueName
    queueMaxDeliveryCount: queueMaxDeliveryCount
    queueLockDurationSecs: queueLockDurationSecs
    queueDuplicateDetectionWindow: queueDuplicateDetectionWindow
    appPrincipalId: identity.outputs.appPrincipalId
    scalerPrincipalId: identity.outputs.scalerPrincipalId
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsId
  }
}

module redis './modules/redis.bicep' = if (ledger == 'redis') {
  name: 'redis'
  params: {
    location: location
    name: redisName
    sku: redisSku
    appPrincipalId: identity.outputs.appPrincipalId
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsId
  }
}

module postgres './modules/postgres.bicep' = if (ledger == 'postgres') {
  name: 'postgres'
  params: {
    location: location
    name: postgresServerName
    skuName: postgresSkuName
    skuTier: postgresSkuTier
    version: postgresVersion
    storageGb: postgresStorageGb
    adminObjectId: postgresAdminObjectId
    adminName: postgresAdminName
    adminType: postgresAdminType
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsId
  }
}

module keyVault './modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    location: location
    name: keyVaultName
    vendorKeys: vendorKeys
    adminTokens: adminTokens
    appPrincipalId: identity.outputs.appPrincipalId
    logAnalyticsWorkspaceId: monitoring.outputs.logAnalyticsId
  }
}

module registryAccess './modules/registry-access.bicep' = if (!empty(registryName)) {
  name: 'registry-access'
  scope: resourceGroup(empty(registryResourceGroup) ? resourceGroup().name : registryResourceGroup)
  params: {
    registryName: registryName
    appPrincipalId: identity.outputs.appPrincipalId
  }
}

module metricsCollector './modules/otel-collector.bicep' = if (deployMetricsCollector) {
  name: 'otel-collector'
  params: {
    location: location
    name: metricsCollectorAppName
    environmentId: containerEnvironment.outputs.environmentId
    image: metricsCollectorImage
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
  }
}

// Uses every data module's outputs, so it starts only after all of them (and
// their role assignments) have been deployed.
module apps './modules/apps.bicep' = {
  name: 'apps'
  dependsOn: [
    registryAccess
  ]
  params: {
    location: location
    environmentId: containerEnvironment.outputs.environmentId
    apiAppName: apiAppName
    processorAppName: processorAppName
    image: image
    registryServer: empty(registryName) ? '' : '${registryName}${environment().suffixes.acrLoginServer}'
    appIdentityId: identity.outputs.appIdentityId
    appClientId: identity.outputs.appClientId
    appPrincipalId: identity.outputs.appPrincipalId
    appIdentityName: identity.outputs.appIdentityName
    scalerIdentityId: identity.outputs.scalerIdentityId
    storageAccountUrl: storage.outputs.accountUrl
    walContainerName: storage.outputs.walContainerName
    ledger: ledger
    redisHostName: redis.?outputs.hostName ?? ''
    redisPort: redis.?outputs.port ?? 10000
    postgresHostName: postgres.?outputs.hostName ?? ''
    postgresDatabaseName: postgres.?outputs.databaseName ?? ''
    serviceBusNamespaceName: serviceBus.outputs.namespaceName
    serviceBusFqdn: serviceBus.outputs.namespaceFqdn
    queueName: serviceBus.outputs.queueName
    queueLockDurationSecs: queueLockDurationSecs
    downstreamUrl: downstreamUrl
    maxRetries: maxRetries
    backoffBaseSecs: backoffBaseSecs
    backoffMaxSecs: backoffMaxSecs
    logLevel: logLevel
    vendorKeysSecretUrl: keyVault.outputs.vendorKeysSecretUrl
    adminTokensSecretUrl: keyVault.outputs.adminTokensSecretUrl
    metricsEndpoint: metricsCollector.?outputs.otlpMetricsUrl ?? ''
    apiTrustedProxies: apiTrustedProxies
    apiIpAllowList: apiIpAllowList
    apiClientCertificateMode: apiClientCertificateMode
    apiMinReplicas: apiMinReplicas
    apiMaxReplicas: apiMaxReplicas
    apiConcurrentRequests: apiConcurrentRequests
    processorMinReplicas: processorMinReplicas
    processorMaxReplicas: processorMaxReplicas
    processorMessagesPerReplica: processorMessagesPerReplica
  }
}

module alerts './modules/alerts.bicep' = {
  name: 'alerts'
  params: {
    location: location
    prefix: prefix
    serviceBusNamespaceId: serviceBus.outputs.namespaceId
    queueName: serviceBus.outputs.queueName
    appInsightsId: monitoring.outputs.appInsightsId
    apiRoleName: apps.outputs.apiServiceName
    actionGroupId: alertActionGroupId
    oldestPendingAlertSecs: oldestPendingAlertSecs
    http5xxAlertPercent: http5xxAlertPercent
  }
}

module workbook './modules/workbook.bicep' = {
  name: 'workbook'
  params: {
    location: location
    displayName: 'rtpd pipeline (${location})'
    appInsightsId: monitoring.outputs.appInsightsId
    logAnalyticsId: monitoring.outputs.logAnalyticsId
  }
}

// ---------------------------------------------------------------- outputs

@description('Public HTTPS endpoint vendors POST transactions to.')
output apiUrl string = apps.outputs.apiUrl
output storageAccountUrl string = storage.outputs.accountUrl
output walContainerName string = storage.outputs.walContainerName
output serviceBusNamespace string = serviceBus.outputs.namespaceFqdn
output serviceBusQueue string = serviceBus.outputs.queueName
output ledger string = ledger
output redisHostName string = redis.?outputs.hostName ?? ''
output postgresHostName string = postgres.?outputs.hostName ?? ''
output postgresDatabase string = postgres.?outputs.databaseName ?? ''
output keyVaultUri string = keyVault.outputs.vaultUri
output appIdentityName string = identity.outputs.appIdentityName
output appIdentityClientId string = identity.outputs.appClientId
output appIdentityPrincipalId string = identity.outputs.appPrincipalId
output appInsightsName string = monitoring.outputs.appInsightsName
output workbookId string = workbook.outputs.workbookId
