// Azure Managed Redis (Microsoft.Cache/redisEnterprise) holding the ledger.
// Access keys are disabled: clients authenticate with Entra ID tokens, and the
// app identity is given the database's `default` data access policy.

param location string
param name string

@description('Azure Managed Redis SKU, e.g. Balanced_B1, MemoryOptimized_M10.')
param sku string

@description('Principal (object) id of the identity rtpd runs as; it is also the Redis user name.')
param appPrincipalId string

@description('Log Analytics workspace receiving connection logs and metrics.')
param logAnalyticsWorkspaceId string

resource cluster 'Microsoft.Cache/redisEnterprise@2025-07-01' = {
  name: name
  location: location
  sku: {
    name: sku
  }
  properties: {
    minimumTlsVersion: '1.2'
    highAvailability: 'Enabled'
  }
}

resource database 'Microsoft.Cache/redisEnterprise/databases@2025-07-01' = {
  parent: cluster
  name: 'default' // the only database name Azure Managed Redis accepts
  properties: {
    clientProtocol: 'Encrypted'
    port: 10000
    // One endpoint speaking the plain (non-cluster) protocol: no cluster-aware client needed.
    clusteringPolicy: 'EnterpriseCluster'
    // Ledger entries must never be evicted to make room.
    evictionPolicy: 'NoEviction'
    // The ledger can be rebuilt from the WAL and the outcome journal; AOF makes
    // that rare rather than routine.
    persistence: {
      aofEnabled: true
      aofFrequency: '1s'
    }
    accessKeysAuthentication: 'Disabled'
  }
}

resource appAccess 'Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments@2025-07-01' = {
  parent: database
  name: 'rtpdapp'
  properties: {
    accessPolicyName: 'default'
    user: {
      objectId: appPrincipalId
    }
  }
}

// Connection events (who connected, authenticated, disconnected) are a
// database-level log; metrics are the cluster's.
resource clusterDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: cluster
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

resource databaseDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: database
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
  }
}

output hostName string = cluster.properties.hostName
output port int = database.properties.port
