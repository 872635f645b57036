// Log Analytics workspace and the Container Apps environment that ships to it.

param location string
param logAnalyticsName string
param environmentName string
param logRetentionDays int

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
  }
}

resource appsEnvironment 'Microsoft.App/managedEnvironments@2025-01-01' = {
  name: environmentName
  location: location
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
    ]
    // Zone redundancy needs a VNet-integrated environment (infrastructureSubnetId);
    // see docs/deploy.md, "Not covered here".
    zoneRedundant: false
  }
}

output environmentId string = appsEnvironment.id
output defaultDomain string = appsEnvironment.properties.defaultDomain
