// Lets the app identity pull images from an existing Azure Container Registry,
// possibly in another resource group. Deployed at the registry's resource group
// scope by main.bicep, before the container apps that pull from it.

param registryName string
param appPrincipalId string

// Built-in role: AcrPull.
var acrPullRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '7f951dda-4ed3-4680-a7ca-43fe172d538d')

resource registry 'Microsoft.ContainerRegistry/registries@2025-11-01' existing = {
  name: registryName
}

resource appPulls 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, appPrincipalId, acrPullRoleId)
  scope: registry
  properties: {
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: acrPullRoleId
  }
}

output loginServer string = registry.properties.loginServer
