// Storage account holding the WAL: geo-zone-redundant, versioned, soft-deleted,
// Entra ID only, and a WAL container under a time-based WORM policy. The app
// identity may read and write blobs in that container and nowhere else.

param location string
param name string

@allowed([
  'Standard_GZRS'
  'Standard_RAGZRS'
])
param sku string

param walContainerName string

@description('Days a WAL blob stays immutable (undeletable, unmodifiable) after it is written.')
@minValue(1)
param walImmutabilityDays int

@minValue(1)
@maxValue(365)
param softDeleteDays int

@description('Principal (object) id of the identity rtpd runs as.')
param appPrincipalId string

@description('Log Analytics workspace receiving the blob logs and the account metrics.')
param logAnalyticsWorkspaceId string

// Built-in role: Storage Blob Data Contributor.
var blobDataContributorRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'ba92f5b4-2d11-453d-a403-e96b0029c9fe')

resource account 'Microsoft.Storage/storageAccounts@2026-09-01' = {
  name: name
  location: location
  kind: 'StorageV2'
  sku: {
    name: sku
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2026-09-01' = {
  parent: account
  name: 'default'
  properties: {
    isVersioningEnabled: true
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
  }
}

resource walContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2026-09-01' = {
  parent: blobService
  name: walContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Segments are written once (conditional create) and never appended to, so
// protected append writes stay off. The policy is created unlocked; locking it
// is a deliberate, irreversible operator step (docs/deploy.md).
resource walWorm 'Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies@2026-09-01' = {
  parent: walContainer
  name: 'default'
  properties: {
    immutabilityPeriodSinceCreationInDays: walImmutabilityDays
    allowProtectedAppendWrites: false
  }
}

resource walWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(walContainer.id, appPrincipalId, blobDataContributorRoleId)
  scope: walContainer
  properties: {
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: blobDataContributorRoleId
  }
}

// Every read, write and delete on blobs (the WAL's audit trail), and capacity and
// transaction metrics. Diagnostic settings are per service: the account itself
// has metrics only.
resource accountDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: account
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: blobService
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

output accountName string = account.name
// No trailing slash: rtpd appends the container name.
output accountUrl string = 'https://${account.name}.blob.${environment().suffixes.storage}'
output walContainerName string = walContainer.name
