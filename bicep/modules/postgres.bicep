// Azure Database for PostgreSQL Flexible Server holding the ledger (ledger =
// postgres): zone-redundant high availability (a synchronous standby in
// another zone), Entra ID authentication only (no passwords), geo-redundant
// backups for point-in-time restore.
//
// The app identity is NOT an administrator. An Entra administrator (a group of
// operators) creates rtpd's database role once, mapped to the app identity's
// object id; see docs/deploy.md, "PostgreSQL ledger: one-time role". rtpd
// connects as that role with an Entra token as the password.

param location string
param name string

@description('Compute SKU, e.g. Standard_D2ds_v5.')
param skuName string

@allowed([
  'GeneralPurpose'
  'MemoryOptimized'
])
param skuTier string

param version string

@minValue(32)
param storageGb int

@description('Object id of the Entra user, group or service principal administering the server.')
param adminObjectId string

@description('Its display name (user principal name for a user).')
param adminName string

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param adminType string

param logAnalyticsWorkspaceId string

@description('Name of the database rtpd keeps its ledger in.')
param databaseName string = 'rtpd'

resource server 'Microsoft.DBforPostgreSQL/flexibleServers@2026-10-01' = {
  name: name
  location: location
  sku: {
    name: skuName
    tier: skuTier
  }
  properties: {
    version: version
    storage: {
      storageSizeGB: storageGb
      autoGrow: 'Enabled'
    }
    authConfig: {
      activeDirectoryAuth: 'Enabled'
      passwordAuth: 'Disabled'
      tenantId: subscription().tenantId
    }
    highAvailability: {
      mode: 'ZoneRedundant'
    }
    backup: {
      backupRetentionDays: 35
      geoRedundantBackup: 'Enabled'
    }
    network: {
      // Same posture as Storage, Service Bus and Redis here: public endpoint,
      // Entra ID only. Private access needs a VNet (docs/deploy.md).
      publicNetworkAccess: 'Enabled'
    }
  }
}

resource administrator 'Microsoft.DBforPostgreSQL/flexibleServers/administrators@2026-10-01' = {
  parent: server
  name: adminObjectId
  properties: {
    principalName: adminName
    principalType: adminType
    tenantId: subscription().tenantId
  }
}

resource database 'Microsoft.DBforPostgreSQL/flexibleServers/databases@2026-10-01' = {
  parent: server
  name: databaseName
  properties: {
    charset: 'UTF8'
    collation: 'en_US.utf8'
  }
  dependsOn: [
    administrator
  ]
}

// Container Apps on the Consumption profile have no fixed outbound address:
// this rule (0.0.0.0 to 0.0.0.0) admits connections from Azure services. The
// server still accepts only Entra ID tokens for roles it knows.
resource allowAzureServices 'Microsoft.DBforPostgreSQL/flexibleServers/firewallRules@2026-10-01' = {
  parent: server
  name: 'AllowAllAzureServicesAndResourcesWithinAzureIps'
  properties: {
    startIpAddress: '0.0.0.0'
    endIpAddress: '0.0.0.0'
  }
}

resource serverDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: server
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
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output hostName string = server.properties.fullyQualifiedDomainName
output databaseName string = database.name
